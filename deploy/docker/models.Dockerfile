# The model repository as an OCI image, for deploy/k8s/overlays/models-image (an image volume mounted at /models).
#   find model_repository -name __pycache__ -prune -exec rm -rf {} +
#   docker build -f deploy/docker/models.Dockerfile -t recserve-models:1 .
# Data only (no shell, no entrypoint): the kubelet mounts its filesystem read-only; nothing runs from it.
FROM scratch
COPY model_repository/ /
