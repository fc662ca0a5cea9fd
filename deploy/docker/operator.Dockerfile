# The recserve operator image (deploy/k8s/base/operator-deployment.yaml expects recserve-operator:0.1.0).
#   docker build -f deploy/docker/operator.Dockerfile -t recserve-operator:0.1.0 .
#   kind load docker-image recserve-operator:0.1.0        # or push to your registry and set the image in an overlay
# Built from declared inputs only: the committed sources and deploy/docker/operator-requirements.txt (the
# operator's run-time packages, pinned; no torch). Nothing from artifacts/ or other build output: the model
# repository (and, optionally, the build's golden.json as the ConfigMap recserve-golden) come from the cluster.
# It runs the control plane only (golden answers via recserve.build.reference on onnxruntime); Triton itself runs
# from the NGC image.
FROM python:3.11-slim-bookworm AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY recserve ./recserve
COPY build ./build
COPY control ./control
COPY perf ./perf
COPY drills ./drills
# protoc first (its output goes into the wheel), with the import rewrite `make proto` does; the wheel only, no deps
RUN pip install --no-cache-dir grpcio-tools==1.62.3 \
 && python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. control/api/proto/*.proto \
 && sed -i 's/^from control\.proto import/from recserve.control.api.proto import/' control/api/proto/*_pb2_grpc.py \
 && pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
COPY deploy/docker/operator-requirements.txt /tmp/operator-requirements.txt
COPY --from=wheel /wheels /tmp/wheels
RUN pip install --no-cache-dir -r /tmp/operator-requirements.txt \
 && pip install --no-cache-dir --no-deps /tmp/wheels/recserve-*.whl \
 && rm -rf /tmp/wheels /tmp/operator-requirements.txt
# not the sources' folder: python -m puts the working directory first on sys.path
WORKDIR /var/lib/recserve
USER 1000:1000
ENTRYPOINT ["python", "-m", "recserve.control.kube.operator"]
