# The recserve operator image (deploy/k8s/base/operator-deployment.yaml expects recserve-operator:0.1.0).
#   docker build -f deploy/docker/operator.Dockerfile -t recserve-operator:0.1.0 .
#   kind load docker-image recserve-operator:0.1.0        # or push to your registry and set the image in an overlay
# It runs the control plane only (golden answers via recserve.build.reference on onnxruntime, the model repository
# mounted read-only); Triton itself runs from the NGC image.
FROM python:3.11-slim-bookworm
WORKDIR /app
COPY pyproject.toml README.md ./
COPY recserve ./recserve
COPY build ./build
COPY control ./control
COPY perf ./perf
COPY drills ./drills
COPY artifacts ./artifacts
# protoc first (its output goes into the wheel), with the import rewrite `make proto` does
RUN pip install --no-cache-dir grpcio-tools==1.62.3 \
 && python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. control/api/proto/*.proto \
 && sed -i 's/^from control\.proto import/from recserve.control.api.proto import/' control/api/proto/*_pb2_grpc.py \
 && pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu '.[deploy]'
USER 1000:1000
ENTRYPOINT ["python", "-m", "recserve.control.kube.operator"]
