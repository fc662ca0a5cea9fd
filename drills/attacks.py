"""The attack catalogue: what a hostile or broken client can send to the fleet's front door, one function each.

Every attack runs against a real fleet through HAProxy (``Target``: its client ports, and the control API for the
token attack), only to loopback, with bounded loops and sockets it closes itself. Each returns an ``Outcome``: was
it refused, with which status and message, and how long the refusal took. ``tests/test_front_door.py`` asserts the
outcomes (and that the fleet kept serving, unchanged); the ``security`` drill runs the same functions while its
probe counts failed legitimate requests (``drills/faults.py``: ``Attacks``).
"""

from __future__ import annotations

import http.client
import json
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

GRPC_SERVICE = "inference.GRPCInferenceService"


@dataclass(frozen=True)
class Target:
    """Where the attacks go: HAProxy's client ports (host:port) and, for the token attack, the control API."""

    grpc: str
    http: str
    control: str = ""
    control_ca: Path | None = None


@dataclass
class Outcome:
    attack: str
    #: True when the front door (or Triton, for malformed bodies) refused it with the expected kind of answer.
    refused: bool
    #: "HTTP 403", "gRPC PERMISSION_DENIED", ... (what the client saw)
    status: str
    message: str
    seconds: float

    def line(self) -> str:
        verdict = "refused" if self.refused else "NOT REFUSED"
        return f"{self.attack}: {verdict} {self.status} in {self.seconds * 1000:.0f} ms: {self.message[:160]}"


# ------------------------------------------------------------------ clients
def _http(target: Target, method: str, path: str, body: bytes | None = None,
          headers: dict[str, str] | None = None, timeout: float = 10.0) -> tuple[int, str]:
    host, port = target.http.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read().decode(errors="replace")
    finally:
        conn.close()


def _grpc_call(target: Target, call: Callable, expect: tuple[str, ...]) -> tuple[bool, str, str]:
    """Run ``call(client)`` with tritonclient's gRPC client; (refused with one of ``expect``, status, message)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(target.grpc)
    try:
        call(client)
        return False, "gRPC OK", "the call succeeded"
    except InferenceServerException as exc:
        status = str(exc.status() or "")
        return status.endswith(expect), f"gRPC {status.removeprefix('StatusCode.')}", exc.message() or str(exc)
    finally:
        client.close()


def _timed(name: str, fn: Callable[[], tuple[bool, str, str]]) -> Outcome:
    t0 = time.monotonic()
    refused, status, message = fn()
    return Outcome(name, refused, status, message.strip(), time.monotonic() - t0)


def _http_refused(name: str, target: Target, method: str, path: str, expect: int, body: bytes | None = None,
                  headers: dict[str, str] | None = None) -> Outcome:
    def run() -> tuple[bool, str, str]:
        code, text = _http(target, method, path, body, headers)
        return code == expect, f"HTTP {code}", text

    return _timed(name, run)


def _grpc_refused(name: str, target: Target, call: Callable,
                  expect: tuple[str, ...] = ("PERMISSION_DENIED",)) -> Outcome:
    return _timed(name, lambda: _grpc_call(target, call, expect))


def _recommend_inputs(history_len: int):
    import tritonclient.grpc as grpcclient

    a = grpcclient.InferInput("user_id", [1, 1], "INT64")
    a.set_data_from_numpy(np.asarray([[7]], dtype=np.int64))
    b = grpcclient.InferInput("history", [1, history_len], "INT64")
    b.set_data_from_numpy(np.arange(history_len, dtype=np.int64).reshape(1, -1) % 1000)
    return [a, b]


# ------------------------------------------------------------------ admin surfaces: must be refused by the allow-list
SHM_KEY = "/triton_python_backend_shm_region_0"  # what once killed the primary (any existing /dev/shm key)


def shm_register(target: Target) -> list[Outcome]:
    body = json.dumps({"key": SHM_KEY, "offset": 0, "byte_size": 64}).encode()
    cuda = json.dumps({"raw_handle": {"b64": "AAAA"}, "device_id": 0, "byte_size": 64}).encode()
    return [
        _http_refused("shm-system-http", target, "POST", "/v2/systemsharedmemory/region/x/register", 403, body),
        _http_refused("shm-cuda-http", target, "POST", "/v2/cudasharedmemory/region/x/register", 403, cuda),
        _grpc_refused("shm-system-grpc", target, lambda c: c.register_system_shared_memory("x", SHM_KEY, 64)),
        _grpc_refused("shm-cuda-grpc", target, lambda c: c.register_cuda_shared_memory("x", b"\0" * 64, 0, 64)),
        _grpc_refused("shm-status-grpc", target, lambda c: c.get_system_shared_memory_status()),
    ]


def log_and_trace_settings(target: Target) -> list[Outcome]:
    return [
        _http_refused("logging-http", target, "POST", "/v2/logging", 403, b'{"log_verbose_level": 2}'),
        _http_refused("trace-http", target, "POST", "/v2/trace/setting", 403, b'{"trace_rate": "1"}'),
        _http_refused("model-trace-http", target, "POST", "/v2/models/recommend/trace/setting", 403,
                      b'{"trace_rate": "1"}'),
        _grpc_refused("logging-grpc", target, lambda c: c.update_log_settings({"log_verbose_level": 2})),
        _grpc_refused("trace-grpc", target, lambda c: c.update_trace_settings(settings={"trace_rate": "1"})),
    ]


def statistics(target: Target) -> list[Outcome]:
    return [
        _http_refused("stats-http", target, "GET", "/v2/models/stats", 403),
        _http_refused("model-stats-http", target, "GET", "/v2/models/recommend/stats", 403),
        _grpc_refused("stats-grpc", target, lambda c: c.get_inference_statistics()),
    ]


def repository(target: Target) -> list[Outcome]:
    return [
        _http_refused("repo-index-http", target, "POST", "/v2/repository/index", 403, b"{}"),
        _http_refused("repo-load-http", target, "POST", "/v2/repository/models/recommend/load", 403, b"{}"),
        _http_refused("repo-unload-http", target, "POST", "/v2/repository/models/recommend/unload", 403, b"{}"),
        _http_refused("model-unload-http", target, "POST", "/v2/models/recommend/unload", 403, b"{}"),
        _grpc_refused("repo-index-grpc", target, lambda c: c.get_model_repository_index()),
        _grpc_refused("repo-load-grpc", target, lambda c: c.load_model("recommend")),
        _grpc_refused("repo-unload-grpc", target, lambda c: c.unload_model("recommend")),
    ]


# ------------------------------------------------------------------ oversized, slow, malformed
def _read_status(sock: socket.socket, timeout: float) -> tuple[int, str]:
    """The status line and body start HAProxy sent (0 when the connection closed without an answer)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    head, _, rest = data.partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    code = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    return code, rest.decode(errors="replace")


def _connect(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


def oversized_http(target: Target, declared: int = 48 * 2**20, upload: int = 16 * 2**20) -> list[Outcome]:
    """A 48 MiB JSON body by Content-Length whose client stops after the headers, a chunked body that never ends
    (refused once the limit is crossed), and tritonclient's HTTP client uploading a 16 MiB history, which sends its
    whole body before it reads: 413 naming the limit each, the time measured to the status. The last one read a
    broken pipe, not the 413, while HAProxy answered with ``http-request return`` (it closed the connection under
    the upload; docs/oversized-requests.md)."""
    path = "/v2/models/recommend/infer"

    def declared_body() -> tuple[bool, str, str]:
        with _connect(target.http) as s:
            s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {declared}\r\n\r\n".encode() + b"[" * 16384)
            code, text = _read_status(s, 10)
        return code == 413, f"HTTP {code}", text

    def chunked_body() -> tuple[bool, str, str]:
        chunk = b"1" * 65536
        frame = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
        with _connect(target.http) as s:
            s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
            sel = selectors.DefaultSelector()
            sel.register(s, selectors.EVENT_READ)
            try:
                for _ in range(256):  # at most 16 MiB
                    if sel.select(0):
                        break
                    s.sendall(frame)
            except (BrokenPipeError, ConnectionResetError):
                pass
            sel.close()
            code, text = _read_status(s, 10)
        return code == 413, f"HTTP {code}", text

    def tritonclient_upload() -> tuple[bool, str, str]:
        import tritonclient.http as httpclient
        from tritonclient.utils import InferenceServerException

        client = httpclient.InferenceServerClient(target.http, network_timeout=30)
        try:
            b = httpclient.InferInput("history", [1, upload // 8], "INT64")
            b.set_data_from_numpy(np.zeros((1, upload // 8), dtype=np.int64), binary_data=True)
            client.infer("recommend", [b])
            return False, "HTTP 200", "the call succeeded"
        except InferenceServerException as exc:
            return exc.status() == "413", f"HTTP {exc.status()}", exc.message() or str(exc)
        except OSError as exc:  # what it read before: BrokenPipeError
            return False, type(exc).__name__, str(exc)
        finally:
            client.close()

    return [_timed("oversized-http-declared", declared_body), _timed("oversized-http-chunked", chunked_body),
            _timed("oversized-http-16MiB", tritonclient_upload)]


def oversized_grpc(target: Target) -> list[Outcome]:
    """Inference requests 4 KB over the default gRPC limit and of 16 MB (history of 2,000,000 items): both get
    RESOURCE_EXHAUSTED naming the limit. The 16 MB one is still uploading when HAProxy's buffer is full and the
    refusal is written; it read CANCELLED (RST_STREAM) while HAProxy wrote it with ``http-request return``, and reads
    the status since the refusal service writes it (docs/oversized-requests.md). Neither reaches an instance;
    neither status is retried (control/client.py retries UNAVAILABLE only)."""
    from recserve.control.routing.frontdoor import GRPC_MAX_BODY

    small, huge = _recommend_inputs((GRPC_MAX_BODY + 4096) // 8), _recommend_inputs(2_000_000)
    return [
        _grpc_refused("oversized-grpc-over-limit", target,
                      lambda c: c.infer("recommend", small, client_timeout=30), ("RESOURCE_EXHAUSTED",)),
        _grpc_refused("oversized-grpc-16MB", target, lambda c: c.infer("recommend", huge, client_timeout=30),
                      ("RESOURCE_EXHAUSTED",)),
    ]


def _slow_grpc_body(target: Target, stall_s: float) -> tuple[bool, str, str]:
    """A ModelInfer whose body never ends (one message sent, then the client stalls without END_STREAM)."""
    import grpc
    from tritonclient.grpc import service_pb2

    first = service_pb2.ModelInferRequest(model_name="search").SerializeToString()
    release = threading.Event()

    def body():
        yield first
        release.wait(stall_s)

    with grpc.insecure_channel(target.grpc) as ch:
        try:
            ch.stream_unary(f"/{GRPC_SERVICE}/ModelInfer")(body(), timeout=stall_s + 5)
            return False, "gRPC OK", "the call succeeded"
        except grpc.RpcError as exc:
            details = exc.details() or ""
            return "status: 408" in details, f"gRPC {exc.code().name}", details
        finally:
            release.set()


def slow_clients(target: Target, wait_s: float = 30.0) -> list[Outcome]:
    """A request whose headers never finish, one whose HTTP body stops after 10 of 1000 bytes, and a gRPC call whose
    body never ends: HAProxy must cut each (408; gRPC clients read that as UNKNOWN "status: 408") before an instance
    sees it. All three wait at once."""
    head = "POST /v2/models/recommend/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    box: dict[str, Outcome] = {}
    grpc_thread = threading.Thread(
        target=lambda: box.update(slow=_timed("slow-body-grpc", lambda: _slow_grpc_body(target, wait_s))), daemon=True)
    grpc_thread.start()
    socks = {"slow-headers-http": _connect(target.http), "slow-body-http": _connect(target.http)}
    t0 = time.monotonic()
    socks["slow-headers-http"].sendall(head.encode())
    socks["slow-body-http"].sendall((head + "Content-Length: 1000\r\n\r\n").encode() + b'{"inputs":')
    out = []
    for name, s in socks.items():
        with s:
            code, text = _read_status(s, max(0.1, wait_s - (time.monotonic() - t0)))
        out.append(Outcome(name, code == 408, f"HTTP {code}", text.strip() or "(no body)", time.monotonic() - t0))
    grpc_thread.join(wait_s + 10)
    out.append(box.get("slow") or Outcome("slow-body-grpc", False, "no answer", "the call never returned", wait_s))
    return out


def malformed_json(target: Target) -> list[Outcome]:
    """Bodies Triton must refuse (HAProxy lets the allowed infer path through; Triton parses and refuses). Triton
    2.51 answers a JSON it cannot parse with HTTP 500 (its INTERNAL), not 400: refused means 400 or 500 with
    Triton's parse error in the body, and the fleet unchanged (HAProxy retries only 503 and connection errors)."""
    path = "/v2/models/recommend/infer"
    bodies = {
        "malformed-json-truncated": b'{"inputs": [{"name": "user_id", ',
        "malformed-json-types": b'{"inputs": [{"name": "history", "shape": [1, -5], "datatype": "INT64", "data": 1}]}',
        "malformed-json-binary": bytes(range(256)) * 4,
    }
    out = []
    for name, body in bodies.items():
        def run(b: bytes = body) -> tuple[bool, str, str]:
            code, text = _http(target, "POST", path, b, {"Content-Type": "application/json"})
            return code in (400, 500) and "parse" in text.lower(), f"HTTP {code}", text
        out.append(_timed(name, run))
    return out


def malformed_protobuf(target: Target) -> list[Outcome]:
    """Bytes that are no ModelInferRequest, sent as one on an allowed method: refused, not a crash."""
    import grpc

    out = []
    for name, garbage in (("malformed-protobuf-ff", b"\xff" * 64), ("malformed-protobuf-truncated", b"\x0a\x09reco")):
        def run(g: bytes = garbage) -> tuple[bool, str, str]:
            with grpc.insecure_channel(target.grpc) as ch:
                try:
                    ch.unary_unary(f"/{GRPC_SERVICE}/ModelInfer")(g, timeout=10)
                    return False, "gRPC OK", "the call succeeded"
                except grpc.RpcError as exc:
                    code = exc.code()
                    ok = code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL)
                    return ok, f"gRPC {code.name}", exc.details() or ""
        out.append(_timed(name, run))
    return out


def idle_connections(target: Target, count: int = 1000, hold_s: float = 0.0,
                     while_open: Callable[[], None] | None = None, wait_close_s: float = 40.0) -> list[Outcome]:
    """``count`` connections that send nothing, half to each client port; ``while_open`` runs while they are all
    open (a legitimate call). Refused means HAProxy closed every one of them itself within ``wait_close_s``."""
    socks: list[socket.socket] = []
    t0 = time.monotonic()
    try:
        for i in range(count):
            s = _connect(target.grpc if i % 2 else target.http)
            s.setblocking(False)
            socks.append(s)
        if while_open is not None:
            while_open()
        time.sleep(hold_s)
        sel = selectors.DefaultSelector()
        for s in socks:
            sel.register(s, selectors.EVENT_READ)
        open_ = set(socks)
        deadline = time.monotonic() + wait_close_s
        while open_ and time.monotonic() < deadline:
            for key, _ in sel.select(0.5):
                s = key.fileobj
                try:
                    data = s.recv(65536)
                except (ConnectionResetError, BlockingIOError):
                    data = b""
                if not data:
                    sel.unregister(s)
                    open_.discard(s)
        sel.close()
        closed = count - len(open_)
        return [Outcome("idle-connections", not open_, f"{closed}/{count} closed by HAProxy",
                        f"{len(open_)} still open after {wait_close_s:.0f}s", time.monotonic() - t0)]
    finally:
        for s in socks:
            s.close()


def bad_bearer_token(target: Target) -> list[Outcome]:
    """A mutating control call with a wrong token (tests/test_control_api.py covers every token shape)."""
    import grpc

    from recserve.control.api.proto import control_pb2 as pb
    from recserve.control.api.proto import control_pb2_grpc as pbg
    from recserve.control.api.tls import control_channel

    def run() -> tuple[bool, str, str]:
        with control_channel(target.control, target.control_ca is not None, target.control_ca) as ch:
            try:
                pbg.ControlPlaneStub(ch).PromoteInstance(pb.InstanceRequest(id="t1"), timeout=10,
                                                         metadata=[("authorization", "Bearer not-the-token")])
                return False, "gRPC OK", "the call succeeded"
            except grpc.RpcError as exc:
                return (exc.code() == grpc.StatusCode.UNAUTHENTICATED, f"gRPC {exc.code().name}",
                        exc.details() or "")

    return [_timed("bad-bearer-token", run)]


#: The catalogue in the order the drill runs it (idle connections and slow clients take their timeouts).
CATALOGUE: dict[str, Callable[[Target], list[Outcome]]] = {
    "shm-register": shm_register,
    "log-trace-settings": log_and_trace_settings,
    "statistics": statistics,
    "repository": repository,
    "oversized-http": oversized_http,
    "oversized-grpc": oversized_grpc,
    "malformed-json": malformed_json,
    "malformed-protobuf": malformed_protobuf,
    "slow-clients": slow_clients,
    "idle-connections": idle_connections,
    "bad-bearer-token": bad_bearer_token,
}


def run_catalogue(target: Target, names: list[str] | None = None) -> list[Outcome]:
    """Every attack in ``names`` (default: all; the token attack only when the target names a control API)."""
    chosen = names or [n for n in CATALOGUE if n != "bad-bearer-token" or target.control]
    unknown = [n for n in chosen if n not in CATALOGUE]
    if unknown:
        raise ValueError(f"attacks: unknown {unknown}; the catalogue has {sorted(CATALOGUE)}")
    out: list[Outcome] = []
    for name in chosen:
        out += CATALOGUE[name](target)
    return out
