"""The fallback server program: degraded ``recommend`` / ``search`` answers (and for their ``_trt`` twins), or
with ``--spec`` the degraded answers a serving spec declares for its models, over Triton's KServe v2 protocols.

Why a Triton look-alike: HAProxy sends overflow and the no-instance-left case here as to just another backend, and
tritonclient users change nothing. It speaks gRPC ``inference.GRPCInferenceService`` (ServerLive/Ready,
ServerMetadata, ModelReady, ModelMetadata, ModelInfer; every other call, the repository and shared-memory APIs
included, answers UNIMPLEMENTED) and HTTP/JSON (``/v2/health/*``, ``/v2/models/<m>[/ready|/infer]`` with the
binary-tensor extension tritonclient uses, ``/metrics``). Requests are validated by ``control/fallback/contract.py``
(the ensembles' own rules and texts; a spec model's config.pbtxt); answers come from ``control/fallback/answers.py``
(a spec model's answer file or provider: ``control/fallback/spec_answers.py``).

Every answer carries the response parameter ``degraded: true`` (gRPC ``ModelInferResponse.parameters``, HTTP JSON
``"parameters"``), and ``recserve_fallback_requests_total{model,protocol,outcome}`` counts degraded answers and
refusals, so clients and metrics can tell a fallback answer from a model's.

Run by ``control.runtime.fallback.FallbackServer``; by hand: ``python -m recserve.control.fallback.app --help``.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import struct
import sys
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import numpy as np
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import deserialize_bytes_tensor, triton_to_np_dtype

from recserve.control.fallback.answers import Catalogue, FallbackAnswers
from recserve.control.fallback.contract import RequestError, Tensor, rules, validate
from recserve.control.fallback.spec_answers import ModelAnswers, demo_models, has_rules, spec_models
from recserve.control.runtime.triton import DEFAULT_REPOSITORY, REPO_ROOT
from recserve.control.spec.repository import RepositoryReadError
from recserve.control.spec.spec import SpecError, load_spec

SERVER_NAME = "recserve-fallback"
MODEL_VERSION = "1"
HEADER_LENGTH = "Inference-Header-Content-Length"
#: Largest HTTP request body read (the largest valid request, 64 rows of 1,000-item histories as JSON, is ~1 MiB).
MAX_BODY_BYTES = 8 << 20
#: The refusal of a model without a degraded answer: HAProxy's own words (control/routing/haproxy.py OVERLOADED).
OVERLOADED = "overloaded, retry later"


class FallbackService:
    """Validation + degraded answers + counters, shared by both protocol front ends."""

    def __init__(
        self, answers: FallbackAnswers | None, repository: Path = DEFAULT_REPOSITORY, models: ModelAnswers | None = None
    ):
        self.answers = answers
        self.repository = repository
        if models is None:  # the demo's ensembles
            models = demo_models(lambda: answers, repository)
        self.specs = models.specs
        self.answerers = models.answerers
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "recserve_fallback_requests",
            "Requests to the fallback server: outcome degraded (answered) or refused (bad input, unknown model)",
            ["model", "protocol", "outcome"],
            registry=self.registry,
        )

    def datatype(self, model: str, output: str) -> str:
        """The KServe datatype of an output, as the ensemble's config declares it."""
        return next(t.datatype for t in self.specs[model].outputs if t.name == output)

    def infer(self, model: str, tensors: dict[str, Tensor], request_id: str, protocol: str) -> dict[str, np.ndarray]:
        """Output arrays by name; RequestError (counted) for what the real ensemble refuses."""
        try:
            spec = self.specs.get(model)
            if spec is None:
                raise RequestError("NOT_FOUND", f"Request for unknown model: '{model}' is not found")
            answer = self.answerers.get(model)
            if answer is None:  # a spec model without ``degraded``: HAProxy's refusal, in its words
                raise RequestError("RESOURCE_EXHAUSTED", OVERLOADED)
            outputs = answer(tensors, validate(spec, tensors, request_id))
        except RequestError:
            self.requests.labels(model if model in self.specs else "unknown", protocol, "refused").inc()
            raise
        self.requests.labels(model, protocol, "degraded").inc()
        return outputs


def decode_tensor(name: str, datatype: str, shape: list[int], raw: bytes | None, data: object) -> Tensor:
    """(datatype, shape, array) from raw little-endian bytes or a JSON/protobuf list; RequestError if they
    do not fit the declared type and shape."""
    shape_t = tuple(int(d) for d in shape)
    count = int(np.prod(shape_t)) if shape_t else 1
    try:
        if datatype == "BYTES":
            if raw is not None:
                arr = deserialize_bytes_tensor(raw)
            else:
                arr = np.asarray([v.encode() if isinstance(v, str) else bytes(v) for v in _flat(data)], dtype=object)
        else:
            np_type = triton_to_np_dtype(datatype)
            if np_type is None:
                raise RequestError("INVALID_ARGUMENT", f"input '{name}' has an unknown data type '{datatype}'")
            arr = np.frombuffer(raw, dtype=np_type) if raw is not None else np.asarray(list(_flat(data)), np_type)
        if arr.size != count:
            raise ValueError(f"{arr.size} elements for shape {list(shape_t)}")
        return datatype, shape_t, arr.reshape(shape_t)
    except (ValueError, TypeError, struct.error) as exc:
        raise RequestError(
            "INVALID_ARGUMENT", f"input '{name}': data does not match its shape or type: {exc}"
        ) from None


def _flat(data: object):
    if isinstance(data, list):
        for v in data:
            yield from _flat(v)
    else:
        yield data


# ------------------------------------------------------------------------------------------------------ gRPC
_GRPC_CODES = {
    "INVALID_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT,
    "NOT_FOUND": grpc.StatusCode.NOT_FOUND,
    "RESOURCE_EXHAUSTED": grpc.StatusCode.RESOURCE_EXHAUSTED,
}
_TYPED_FIELDS = {
    "INT64": "int64_contents",
    "INT32": "int_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BOOL": "bool_contents",
    "BYTES": "bytes_contents",
    "UINT64": "uint64_contents",
}


class GrpcFrontEnd(service_pb2_grpc.GRPCInferenceServiceServicer):
    """KServe v2 gRPC: health, metadata and inference; everything else is UNIMPLEMENTED (the base class)."""

    def __init__(self, service: FallbackService):
        self.service = service

    def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=True)

    def ServerMetadata(self, request, context):
        return service_pb2.ServerMetadataResponse(name=SERVER_NAME, version=MODEL_VERSION, extensions=[])

    def ModelReady(self, request, context):
        ok = request.name in self.service.specs and request.version in ("", MODEL_VERSION)
        return service_pb2.ModelReadyResponse(ready=ok)

    def ModelMetadata(self, request, context):
        spec = self.service.specs.get(request.name)
        if spec is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"Request for unknown model: '{request.name}' is not found")
        meta = spec.metadata()
        return service_pb2.ModelMetadataResponse(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=[service_pb2.ModelMetadataResponse.TensorMetadata(**t) for t in meta["inputs"]],
            outputs=[service_pb2.ModelMetadataResponse.TensorMetadata(**t) for t in meta["outputs"]],
        )

    def ModelInfer(self, request, context):
        try:
            raws = list(request.raw_input_contents)
            tensors = {}
            for k, t in enumerate(request.inputs):
                raw = raws[k] if raws else None
                data = None if raws else list(getattr(t.contents, _TYPED_FIELDS.get(t.datatype, "bytes_contents")))
                tensors[t.name] = decode_tensor(t.name, t.datatype, list(t.shape), raw, data)
            outputs = self.service.infer(request.model_name, tensors, request.id, "grpc")
        except RequestError as err:
            context.abort(_GRPC_CODES.get(err.code, grpc.StatusCode.INVALID_ARGUMENT), err.message)
        wanted = [o.name for o in request.outputs] or list(outputs)
        response = service_pb2.ModelInferResponse(
            model_name=request.model_name, model_version=MODEL_VERSION, id=request.id
        )
        response.parameters["degraded"].bool_param = True
        for name in wanted:
            arr = outputs.get(name)
            if arr is None:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"unexpected inference output '{name}' for model '{request.model_name}'",
                )
            datatype = self.service.datatype(request.model_name, name)
            out = response.outputs.add(name=name, datatype=datatype)
            out.shape.extend(arr.shape)
            response.raw_output_contents.append(raw_bytes(arr, datatype))
        return response


# ------------------------------------------------------------------------------------------------------ HTTP
_MODEL_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready|/infer)?$")


def http_handler(service: FallbackService) -> type[BaseHTTPRequestHandler]:
    """A request handler class bound to ``service`` (HTTP/1.1 keep-alive, as tritonclient's pool expects)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt: str, *args: object) -> None:  # no per-request log lines: they would cost CPU
            return

        def _send(
            self,
            status: int,
            body: bytes = b"",
            content_type: str = "application/json",
            headers: dict[str, str] | None = None,
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, message: str) -> None:
            # 429: HAProxy's own refusal, retry-after included (a spec model without a degraded answer)
            headers = {"retry-after": "1"} if status == 429 else None
            self._send(status, json.dumps({"error": message}).encode(), headers=headers)

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = self.path.split("?", 1)[0]
            if path in ("/v2/health/live", "/v2/health/ready"):
                return self._send(200)
            if path == "/v2":
                return self._send(
                    200,
                    json.dumps(
                        {"name": SERVER_NAME, "version": MODEL_VERSION, "extensions": ["binary_tensor_data"]}
                    ).encode(),
                )
            if path == "/metrics":
                return self._send(200, generate_latest(service.registry), CONTENT_TYPE_LATEST)
            m = _MODEL_PATH.match(path)
            if m and m.group(3) != "/infer":
                spec = service.specs.get(m.group(1))
                version_ok = m.group(2) in (None, MODEL_VERSION)
                if m.group(3) == "/ready":
                    return self._send(200) if spec and version_ok else self._error(400, "Model version not ready")
                if spec is None or not version_ok:
                    return self._error(404, f"Request for unknown model: '{m.group(1)}' is not found")
                return self._send(200, json.dumps(spec.metadata()).encode())
            return self._error(404, "Not Found")

        def do_POST(self) -> None:  # noqa: N802
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_BODY_BYTES:
                self.close_connection = True  # the body is not read: the connection cannot be reused
                return self._error(413, f"request body must be 0..{MAX_BODY_BYTES} bytes (Content-Length)")
            body = self.rfile.read(length)
            m = _MODEL_PATH.match(self.path.split("?", 1)[0])
            if not m or m.group(3) != "/infer":
                return self._error(404, "Not Found")
            header_len = int(self.headers.get(HEADER_LENGTH) or len(body))
            try:
                request = json.loads(body[:header_len])
                tensors, offset = {}, header_len
                for t in request.get("inputs", []):
                    size = (t.get("parameters") or {}).get("binary_data_size")
                    raw = None
                    if size is not None:
                        raw, offset = body[offset : offset + int(size)], offset + int(size)
                    tensors[t["name"]] = decode_tensor(t["name"], t["datatype"], t["shape"], raw, t.get("data"))
                outputs = service.infer(m.group(1), tensors, str(request.get("id", "")), "http")
            except RequestError as err:
                return self._error(err.http_status, err.message)
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                return self._error(400, f"failed to parse the request JSON buffer: {exc}")
            self._answer(m.group(1), request, outputs)

        def _answer(self, model: str, request: dict, outputs: dict[str, np.ndarray]) -> None:
            asked = request.get("outputs") or [
                {
                    "name": n,
                    "parameters": {"binary_data": bool((request.get("parameters") or {}).get("binary_data_output"))},
                }
                for n in outputs
            ]
            head: dict = {
                "model_name": model,
                "model_version": MODEL_VERSION,
                "parameters": {"degraded": True},
                "outputs": [],
            }
            if "id" in request:
                head["id"] = request["id"]
            blobs = []
            for o in asked:
                arr = outputs.get(o["name"])
                if arr is None:
                    return self._error(400, f"unexpected inference output '{o['name']}' for model '{model}'")
                datatype = service.datatype(model, o["name"])
                out = {"name": o["name"], "datatype": datatype, "shape": list(arr.shape)}
                if (o.get("parameters") or {}).get("binary_data"):
                    blob = raw_bytes(arr, datatype)
                    out["parameters"] = {"binary_data_size": len(blob)}
                    blobs.append(blob)
                else:
                    flat = arr.reshape(-1).tolist()
                    out["data"] = [v.decode("utf-8", "replace") for v in flat] if datatype == "BYTES" else flat
                head["outputs"].append(out)
            header = json.dumps(head).encode()
            if blobs:
                self._send(200, header + b"".join(blobs), "application/octet-stream", {HEADER_LENGTH: str(len(header))})
            else:
                self._send(200, header)

    return Handler


# ------------------------------------------------------------------------------------------------------ main
def build_service(repository: Path, events_csv: Path, catalog_csv: Path, spec: Path | None = None) -> FallbackService:
    """Everything precomputed before the first request. With ``spec``: the spec's models (SpecError, naming the
    file and field, for one whose answer file does not fit its config); the build's data is read only when a
    model's ``degraded`` names a provider."""
    if spec is None:
        tokenize = rules(repository)["tokenizer"].tokenize
        return FallbackService(FallbackAnswers(Catalogue.from_build(events_csv, catalog_csv), tokenize), repository)
    serving = load_spec(spec, repository)
    answers = None
    if any(m.degraded is not None and m.degraded.provider for m in serving.models.values()):
        # the served tokenizer: the demo repository's when the spec's repository has none
        tokenize = rules(repository if has_rules(repository) else DEFAULT_REPOSITORY)["tokenizer"].tokenize
        answers = FallbackAnswers(Catalogue.from_build(events_csv, catalog_csv), tokenize)
    else:
        tokenize = str.split  # never called: no provider
    return FallbackService(answers, repository, spec_models(serving, lambda: answers, tokenize))


def raw_bytes(arr: np.ndarray, datatype: str) -> bytes:
    """An output tensor as KServe's raw bytes: little-endian values, or 4-byte length-prefixed strings for BYTES."""
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(v)) + v for v in (_as_bytes(x) for x in arr.reshape(-1)))
    return np.ascontiguousarray(arr).tobytes()


def _as_bytes(v: object) -> bytes:
    return v if isinstance(v, bytes) else str(v).encode()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recserve.control.fallback.app", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--grpc-port", type=int, required=True)
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY, help="model repository (contract, rules)")
    p.add_argument("--events", type=Path, default=REPO_ROOT / "artifacts" / "data" / "events.csv")
    p.add_argument("--catalog", type=Path, default=REPO_ROOT / "artifacts" / "data" / "catalog.csv")
    p.add_argument(
        "--spec",
        type=Path,
        default=None,
        help="serving spec: answer its models as their `degraded` says (--repository is its repository)",
    )
    p.add_argument("--workers", type=int, default=4, help="gRPC worker threads")
    p.add_argument(
        "--max-concurrent",
        type=int,
        default=64,
        help="gRPC calls in progress or waiting for a worker; more are refused at once with RESOURCE_EXHAUSTED",
    )
    a = p.parse_args(argv)
    try:
        service = build_service(a.repository, a.events, a.catalog, a.spec)
    except (SpecError, RepositoryReadError, OSError) as exc:
        print(f"fallback not started: {exc}", file=sys.stderr, flush=True)
        return 2
    # Bounded: the fallback takes overflow, so it must refuse fast itself rather than queue without end.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=a.workers), maximum_concurrent_rpcs=a.max_concurrent)
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(GrpcFrontEnd(service), server)
    if server.add_insecure_port(f"{a.host}:{a.grpc_port}") == 0:
        print(f"cannot bind gRPC port {a.host}:{a.grpc_port}", file=sys.stderr)
        return 2
    httpd = ThreadingHTTPServer((a.host, a.http_port), http_handler(service))
    httpd.daemon_threads = True
    server.start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    threading.Thread(target=httpd.serve_forever, name="http", daemon=True).start()
    print(
        f"fallback ready: grpc {a.host}:{a.grpc_port} http {a.host}:{a.http_port} "
        f"({service.answers.n_items if service.answers else 0} items; degraded answers for "
        f"{', '.join(m for m, f in service.answerers.items() if f is not None) or 'no model'})",
        flush=True,
    )
    done.wait()
    httpd.shutdown()
    server.stop(grace=1).wait()
    print("fallback stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
