"""The client front door in HAProxy: which requests clients may send, how big and how slow, and where.

One typed ``FrontDoorConfig`` (validated, errors name the ``recctl up`` flag or field), and the HAProxy lines each
client frontend gets (``frontdoor_lines``); ``control/routing/haproxy.py`` renders them into ``fe_grpc`` / ``fe_http``.

* **Allow-list**, not a deny-list: clients reach inference, health and model metadata/config. Anything else is
  answered by HAProxy itself, before a byte reaches Triton: HTTP 403 with a text body, gRPC ``PERMISSION_DENIED``
  (a Trailers-Only reply: HTTP 200, ``content-type: application/grpc``, ``grpc-status: 7``), each naming the
  refused path. gRPC refusals wait for the request's body first (bounded like every body): a reply written
  before the upload ended was reset by HAProxy 2.6 along with the rest of the stream, reply included. Model
  statistics pass only with the fleet's admin key in the request (``admin-key`` /
  ``triton-grpc-protocol-admin-key``), matched against the key file itself (``-f``), so no copy of the secret lands
  in haproxy.cfg.
* **Bounded bodies** (sizes below, derived from the served contract, or from a serving spec's models:
  ``spec_body_limits``): HTTP with a Content-Length over the limit, or a chunked body awaited until one byte past
  it (``wait-for-body ... at-least limit+1``), gets 413 naming the limit; gRPC bodies carry no Content-Length: the
  frontend awaits the whole body or a full buffer (``tune.bufsize`` holds the largest limit + 16 KiB) and answers
  ``RESOURCE_EXHAUSTED`` naming the limit when ``req.body_len`` is over it. Refusals are not 5xx, so neither
  HAProxy nor a client retry policy retries them.
* **Refusals reach clients whole** (docs/oversized-requests.md): HAProxy 2.6's ``http-request return`` aborts the
  request it answers, so a refusal written while the client was still uploading never reached it (HTTP/1.1: the
  connection closed under tritonclient, which reported a broken pipe instead of the 413; HTTP/2: RST_STREAM CANCEL,
  which gRPC clients reported as CANCELLED instead of the status). The refusals of requests that may still be
  uploading (gRPC: all of the front door's; HTTP: over the size limit) are therefore written by a small Lua service
  (``REFUSE_LUA``, an HAProxy applet): HAProxy then ends the request normally, discarding the rest of the body as it
  arrives, and the client reads the refusal whenever it reads (clients that read while they send, gRPC's and curl,
  stop their upload at once). Nothing is kept: a refused upload holds HAProxy's usual buffers, never its body; at
  most ``refusal_slots`` such refusals per frontend at once (a stick-table counts them until their uploads end),
  beyond that the refusal is written by ``http-request return`` as before; an upload that stalls is cut by
  ``timeout client``. An HTTP client that sends ``Expect: 100-continue`` (curl does, over 1 MiB) gets the 413 before
  it sends a byte of the body.
* **Slow and idle clients**: ``timeout http-request`` covers headers and the awaited body, ``timeout
  http-keep-alive`` and ``timeout client`` bound idle connections, ``maxconn`` bounds each frontend.
* **Exposure**: the bind address (loopback by default; anything else only with TLS unless explicitly allowed) and
  optional TLS terminated by HAProxy (cert and key from files, combined into one 0600 PEM HAProxy reads; ``alpn h2``
  for gRPC).
"""

from __future__ import annotations

import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from recserve.control.keys import SecretFileError, check_private

# ------------------------------------------------------------------ the request sizes the door lets through
#: max_batch_size of every served model (model_repository/*/config.pbtxt).
MAX_BATCH = 64
#: The history limit of ``recommend`` (recommend_pre keeps the last 1000 items: its ``exclude`` input is [1000]).
HISTORY_LIMIT = 1000
INT64_BYTES = 8
#: The contract's largest request: 64 x 1000 INT64 history = 512,000 bytes (plus 64 user ids).
TENSOR_BYTES = MAX_BATCH * HISTORY_LIMIT * INT64_BYTES
#: Batch sizes the DEFAULT limits cover with full 1000-item histories: 8 over gRPC, 4 over HTTP/JSON. Not the
#: contract's 64: the size check needs HAProxy's ``tune.bufsize`` to hold the whole body, and HAProxy 2.6's CPU per
#: request steps up once tune.bufsize reaches 128 KiB (measured through this config, one Triton, 300 rps:
#: ~160 us of HAProxy CPU per request up to 126,000 bytes, 241 us at 135,000, 378 us at the 1.5 MiB that 64 x
#: 1000 needs). Clients that send bigger batches raise ``max_grpc_body`` / ``max_http_body`` and pay that.
DOOR_BATCH_GRPC = 8
DOOR_BATCH_HTTP = 4
#: Protobuf framing (names, shapes, parameters) and gRPC's 5-byte prefix; JSON's keys and brackets.
FRAMING_HEADROOM = 8 * 1024
#: gRPC: raw_input_contents carries the bytes as they are; a client using ``int64_contents`` (varints) needs up to
#: 10 bytes per value.
GRPC_MAX_BODY = DOOR_BATCH_GRPC * (HISTORY_LIMIT + 1) * 10 + FRAMING_HEADROOM  # 88,272 bytes
#: HTTP/JSON: the widest INT64 in text is "-9223372036854775808" (20 chars) plus a separator = 21 bytes per value.
JSON_INT64_CHARS = 21
HTTP_MAX_BODY = DOOR_BATCH_HTTP * (HISTORY_LIMIT + 1) * JSON_INT64_CHARS + FRAMING_HEADROOM  # 92,276 bytes
#: Room in HAProxy's buffer beyond the largest body: request headers and rewrites (tune.maxrewrite).
HEADER_RESERVE = 16 * 1024
#: tune.bufsize from which HAProxy 2.6 costs more CPU per request (glibc's default mmap threshold, 128 KiB).
CHEAP_BUFSIZE = 128 * 1024
#: Refusals written by the refusal service at once, per client frontend (each counts until its client's upload
#: ends; HAProxy discards what still arrives, ~1.4 ms of its CPU per MB over gRPC, measured); more are written by
#: ``http-request return``, whose answer a client still uploading may not read (docs/oversized-requests.md).
REFUSAL_SLOTS = 32
#: The refusal service's Lua heap limit (tune.lua.maxmem, MB); it keeps nothing between requests.
LUA_MAXMEM_MB = 16

# ------------------------------------------------------------------ the request sizes of a serving spec's models
#: With a serving spec (``recctl up --spec``) the limits are computed from its client-facing models instead
#: (``spec_body_limits``): each model's largest request at its ``max_batch``, the largest over models, plus
#: ``FRAMING_HEADROOM``. Bytes per element as a client may legitimately encode it over gRPC: raw_input_contents
#: carries the datatype's own size, the typed ``*_contents`` fields varints (int32/int64/uint64: up to 10 bytes,
#: a negative int32 too; uint32: up to 5), floats and bools fixed sizes; FP16 goes raw only.
GRPC_ELEMENT_BYTES = {"BOOL": 1, "UINT8": 5, "UINT16": 5, "UINT32": 5, "UINT64": 10, "INT8": 10, "INT16": 10,
                      "INT32": 10, "INT64": 10, "FP16": 2, "FP32": 4, "FP64": 8}
#: The same over HTTP/JSON: the widest value as text plus a separator ("false,"; "-2147483648,"; floats as the
#: shortest round-trip text of a double, "-2.2250738585072014e-308," = 25). The binary tensor extension is smaller.
JSON_ELEMENT_CHARS = {"BOOL": 6, "UINT8": 4, "UINT16": 6, "UINT32": 11, "UINT64": 21, "INT8": 5, "INT16": 7,
                      "INT32": 12, "INT64": JSON_INT64_CHARS, "FP16": 25, "FP32": 25, "FP64": 25}
#: A BYTES element's bound when the spec has none (the spec has no size field for strings): this many bytes, or the
#: longest element of the input's values, sample file or golden requests when that is longer. Said in a warning.
DEFAULT_BYTES_ELEMENT = 1024
#: BYTES over gRPC: a 4-byte length prefix in raw_input_contents, or a tag and a varint length (<= 6 bytes) in
#: ``bytes_contents``. Over JSON each byte may be escaped as ``\u00XX`` (6 characters), plus quotes and separator.
BYTES_GRPC_OVERHEAD = 6
BYTES_JSON_CHARS_PER_BYTE = 6
BYTES_JSON_OVERHEAD = 3


@dataclass(frozen=True)
class SpecLimits:
    """The body limits a serving spec's models need: ``grpc``/``http`` in bytes (framing included), which model
    at which batch sets each, and what the front door had to assume (``warnings``)."""

    grpc: int
    http: int
    grpc_model: str
    http_model: str
    batches: dict[str, int]
    warnings: tuple[str, ...]

    def describe(self) -> str:
        return (f"gRPC {self.grpc:,} bytes ({self.grpc_model} at batch {self.batches[self.grpc_model]}), "
                f"HTTP {self.http:,} bytes ({self.http_model} at batch {self.batches[self.http_model]}, as JSON)")


def _bytes_bound(spec, name: str, model, tensor) -> tuple[int, str]:
    """A BYTES input's bound per element, and the warning that says where it came from."""
    rule = model.inputs.get(tensor.name)
    seen = 0
    if rule is not None and rule.values is not None:
        seen = max(len(str(v).encode()) for v in rule.values)
    if rule is not None and rule.file is not None:
        seen = max([seen, *(len(ln.encode()) for ln in Path(rule.file).read_text().splitlines())])
    for g in model.golden:
        arr = g.inputs.get(tensor.name)
        if arr is not None:
            seen = max([seen, *(len(v if isinstance(v, bytes) else str(v).encode()) for v in arr.reshape(-1))])
    bound = max(DEFAULT_BYTES_ELEMENT, seen)
    source = (f"the default {DEFAULT_BYTES_ELEMENT}" if bound == DEFAULT_BYTES_ELEMENT
              else "the longest of its values and golden requests")
    return bound, (f"{spec.path}: models.{name}.inputs.{tensor.name}: BYTES, and a spec cannot bound strings: the "
                   f"front door admits up to {bound} bytes per element ({source}; longest seen {seen}); clients "
                   "sending longer strings need recctl up --max-grpc-body/--max-http-body")


def spec_body_limits(spec) -> SpecLimits:
    """The largest request body each client-facing model of ``spec`` (a ``ServingSpec``) can legitimately send at its
    ``max_batch``, over gRPC and HTTP/JSON, the largest over models plus ``FRAMING_HEADROOM``. A variable dimension
    (-1) is bounded by its input rule's ``length`` high bound; without one it is refused (``FrontDoorError`` naming
    the spec field), since an unbounded input cannot be given a size limit."""
    grpc_best: tuple[int, str] = (0, "")
    http_best: tuple[int, str] = (0, "")
    warnings: list[str] = []
    batches: dict[str, int] = {}
    for name, m in spec.models.items():
        batch = int(m.max_batch)
        batches[name] = batch
        grpc_bytes = http_bytes = 0
        for t in m.info.inputs:
            rule = m.inputs.get(t.name)
            if -1 in t.dims and (rule is None or rule.length is None):
                raise FrontDoorError(
                    f"{spec.path}: models.{name}.inputs.{t.name}: dims {list(t.dims)} have a variable dimension and "
                    "the spec gives no length: add length: [low, high] (high: the most elements a client sends) so "
                    "the front door can bound request bodies, or give recctl up --max-grpc-body and --max-http-body")
            elements = batch
            for d in t.dims:
                elements *= rule.length[1] if d == -1 else d
            if t.datatype == "BYTES":
                bound, warning = _bytes_bound(spec, name, m, t)
                warnings.append(warning)
                grpc_bytes += elements * (bound + BYTES_GRPC_OVERHEAD)
                http_bytes += elements * (bound * BYTES_JSON_CHARS_PER_BYTE + BYTES_JSON_OVERHEAD)
            else:
                grpc_bytes += elements * GRPC_ELEMENT_BYTES[t.datatype]
                http_bytes += elements * JSON_ELEMENT_CHARS[t.datatype]
        grpc_best = max(grpc_best, (grpc_bytes, name), key=lambda x: x[0])
        http_best = max(http_best, (http_bytes, name), key=lambda x: x[0])
    limits = SpecLimits(grpc_best[0] + FRAMING_HEADROOM, http_best[0] + FRAMING_HEADROOM, grpc_best[1],
                        http_best[1], batches, tuple(warnings))
    need = FrontDoorConfig(max_grpc_body=limits.grpc, max_http_body=limits.http).bufsize()
    if need > CHEAP_BUFSIZE:
        warnings.append(f"{spec.path}: the front door's limits ({limits.describe()}) make HAProxy's tune.bufsize "
                        f"{need:,} bytes, over {CHEAP_BUFSIZE:,}: the buffer is global (every buffer HAProxy "
                        "allocates, a few per in-flight request), and HAProxy's CPU per request steps up above it "
                        "(docs/security.md, 'Bounded requests'); smaller batches or bounds keep it cheaper")
        limits = SpecLimits(limits.grpc, limits.http, limits.grpc_model, limits.http_model, batches, tuple(warnings))
    return limits


# ------------------------------------------------------------------ the allow-list
GRPC_SERVICE = "/inference.GRPCInferenceService/"
#: gRPC methods clients may call. Not ModelStreamInfer: no served model is decoupled, and a stream has no end to
#: bound its size by. Everything else of the service (Repository*, *SharedMemory*, LogSettings, TraceSetting,
#: ModelStatistics without the admin key, ModelStreamInfer) is refused.
GRPC_ALLOWED = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelConfig",
                "ModelInfer")
GRPC_STATISTICS = "ModelStatistics"
#: KServe v2 HTTP paths clients may use (GET unless it says POST); model names as Triton's repository allows.
_MODEL = r"/v2/models/[A-Za-z0-9_.-]+(/versions/[0-9]+)?"
HTTP_READ = (r"^/v2$", r"^/v2/health/(live|ready)$", rf"^{_MODEL}$", rf"^{_MODEL}/(ready|config)$")
HTTP_INFER = (rf"^{_MODEL}/infer$",)
HTTP_STATISTICS = (r"^/v2/models/stats$", rf"^{_MODEL}/stats$")
ADMIN_HEADER_HTTP = "admin-key"
ADMIN_HEADER_GRPC = "triton-grpc-protocol-admin-key"
ALLOWED_TEXT = "clients may call inference, health and model metadata/config only"


class FrontDoorError(ValueError):
    """A front-door setting that cannot work; the message names the flag and the rule."""


@dataclass
class FrontDoorConfig:
    """Settings of the client frontends; ``validate`` refuses what cannot work before anything is written."""

    #: Address the client ports bind (``--client-bind``); loopback by default.
    bind: str = "127.0.0.1"
    #: PEM certificate (chain) and private key (``--client-tls-cert``/``--client-tls-key``): HAProxy terminates TLS.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: A non-loopback bind without TLS is refused unless this is set (``--client-allow-plaintext``).
    allow_plaintext: bool = False
    #: TLS from a certificate HAProxy reads where it runs, not here (Kubernetes: a mounted ``kubernetes.io/tls``
    #: Secret, the key beside it as ``<path>.key``, which HAProxy loads by itself): instead of tls_cert/tls_key.
    tls_crt_path: str | None = None
    max_grpc_body: int = GRPC_MAX_BODY
    max_http_body: int = HTTP_MAX_BODY
    #: Headers plus the awaited body must arrive within this (slow clients are cut: HTTP 408).
    timeout_http_request_s: float = 5.0
    #: An idle HTTP/1.1 keep-alive connection between requests.
    timeout_keep_alive_s: float = 5.0
    #: Client inactivity (also an idle HTTP/2 connection).
    timeout_client_s: float = 30.0
    #: Concurrent connections per client frontend (more wait in the kernel's accept queue).
    maxconn: int = 2000
    #: The fleet's admin key file: its holder may read statistics through HAProxy; None = statistics refused.
    admin_key_file: Path | None = None
    #: Refusals of still-uploading requests written by the refusal service at once, per client frontend.
    refusal_slots: int = REFUSAL_SLOTS

    def validate(self) -> None:
        try:
            addr = ipaddress.ip_address(self.bind.strip("[]"))
        except ValueError:
            raise FrontDoorError(f"--client-bind {self.bind!r}: not an IP address (give the address to listen on, "
                                 "e.g. 127.0.0.1, 10.0.0.5 or 0.0.0.0)") from None
        if (self.tls_cert is None) != (self.tls_key is None):
            raise FrontDoorError("--client-tls-cert and --client-tls-key go together (certificate and private key)")
        if self.tls_crt_path is not None and (self.tls_cert is not None or not self.tls_crt_path.startswith("/")):
            raise FrontDoorError("front door: tls_crt_path is an absolute path on the HAProxy host, instead of "
                                 "--client-tls-cert/--client-tls-key")
        if self.tls_crt_path is not None:
            pass
        elif self.tls_cert is not None and self.tls_key is not None:
            for flag, path in (("--client-tls-cert", self.tls_cert), ("--client-tls-key", self.tls_key)):
                if not Path(path).is_file():
                    raise FrontDoorError(f"{flag} {path}: no such file")
            try:
                check_private(Path(self.tls_key))
            except SecretFileError as exc:
                raise FrontDoorError(f"--client-tls-key: {exc}") from None
            try:
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(str(self.tls_cert),
                                                                                    str(self.tls_key))
            except (ssl.SSLError, ValueError) as exc:
                raise FrontDoorError(f"--client-tls-cert {self.tls_cert} / --client-tls-key {self.tls_key}: not a "
                                     f"PEM certificate and its matching private key ({exc})") from None
        elif not addr.is_loopback and not self.allow_plaintext:
            raise FrontDoorError(f"--client-bind {self.bind} is not loopback: client ports leave this host only with "
                                 "TLS (--client-tls-cert/--client-tls-key), or say --client-allow-plaintext "
                                 "(a private network you trust)")
        for name in ("max_grpc_body", "max_http_body", "maxconn", "refusal_slots"):
            if getattr(self, name) < 1:
                raise FrontDoorError(f"front door: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("timeout_http_request_s", "timeout_keep_alive_s", "timeout_client_s"):
            if not getattr(self, name) > 0:
                raise FrontDoorError(f"front door: {name} must be > 0, got {getattr(self, name)}")
        if self.admin_key_file is not None and not Path(self.admin_key_file).is_file():
            raise FrontDoorError(f"front door: admin_key_file {self.admin_key_file}: no such file")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None or self.tls_crt_path is not None

    def dial_host(self) -> str:
        """The address local tools dial for the client ports: the bind address, or loopback for a wildcard."""
        addr = ipaddress.ip_address(self.bind.strip("[]"))
        if addr.is_unspecified:
            return "127.0.0.1" if addr.version == 4 else "[::1]"
        return f"[{addr}]" if addr.version == 6 else str(addr)

    def bufsize(self) -> int:
        """HAProxy's ``tune.bufsize``: the largest allowed body + 1 byte, plus ``HEADER_RESERVE`` for headers and
        rewrites, rounded up to 4 KiB, so the size check sees the limit crossed before the buffer is full. With the
        default limits it stays under ``CHEAP_BUFSIZE``."""
        need = max(self.max_grpc_body, self.max_http_body) + 1 + HEADER_RESERVE
        return -(-need // 4096) * 4096


def _ms(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


def pem_path(workdir: Path) -> Path:
    return Path(workdir) / "client-tls.pem"


def lua_path(workdir: Path) -> Path:
    return Path(workdir) / "frontdoor.lua"


#: The refusal services (``http-request use-service lua.recserve_refuse_<proto>``). The frontend's rules put the
#: refusal in transaction variables (``txn.fd_code``: the gRPC status or the HTTP status; ``txn.fd_msg``); the service
#: answers at once, without reading the body: gRPC as a Trailers-Only reply (HTTP 200, content-type
#: application/grpc, grpc-status, grpc-message; one HEADERS frame with END_STREAM), HTTP with KServe v2's JSON error
#: body (tritonclient shows its words; a text body reached its users as "Parse error at offset 0"). Unlike
#: ``http-request return``, an applet's answer leaves the request to end normally: HAProxy discards the rest of the
#: body as it arrives instead of resetting the stream or closing the connection under the upload.
REFUSE_LUA = """-- generated by recserve (control/routing/frontdoor.py):
-- the front door's refusals of requests still uploading
core.register_service("recserve_refuse_grpc", "http", function(applet)
  applet:set_status(200)
  applet:add_header("content-type", "application/grpc")
  applet:add_header("grpc-status", tostring(applet:get_var("txn.fd_code")))
  applet:add_header("grpc-message", applet:get_var("txn.fd_msg"))
  applet:start_response()
end)

core.register_service("recserve_refuse_http", "http", function(applet)
  local body = '{"error":"' .. applet:get_var("txn.fd_msg") .. '"}'
  applet:set_status(applet:get_var("txn.fd_code"))
  applet:add_header("content-type", "application/json")
  applet:add_header("content-length", tostring(#body))
  applet:start_response()
  applet:send(body)
end)
"""


def prepare_files(c: FrontDoorConfig, workdir: Path) -> None:
    """Write the refusal services (``REFUSE_LUA``) and, with TLS, the certificate and key as the one 0600 PEM file
    HAProxy's ``crt`` reads."""
    lua_path(workdir).write_text(REFUSE_LUA)
    path = pem_path(workdir)
    if c.tls_cert is None:
        path.unlink(missing_ok=True)
        return
    data = Path(c.tls_cert).read_bytes().rstrip(b"\n") + b"\n" + Path(c.tls_key).read_bytes()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def global_lines(c: FrontDoorConfig, workdir: Path) -> list[str]:
    """Lines of HAProxy's ``global`` section the front door needs: buffers that can hold the largest body, and the
    refusal services (``prepare_files`` writes them)."""
    return [f"  tune.bufsize {c.bufsize()}", f"  tune.lua.maxmem {LUA_MAXMEM_MB}", f"  lua-load {lua_path(workdir)}"]


def bind_line(c: FrontDoorConfig, proto: str, port: int, workdir: Path) -> str:
    host = f"[{c.bind.strip('[]')}]" if ":" in c.bind else c.bind
    line = f"  bind {host}:{port}"
    if c.tls:
        line += f" ssl crt {c.tls_crt_path or pem_path(workdir)} alpn " + ("h2" if proto == "grpc" else "http/1.1")
    elif proto == "grpc":
        line += " proto h2"
    return line


#: Every gRPC reply HAProxy writes itself without a content-type gets ``application/grpc``: grpc-go and grpc-java
#: read a reply without it as malformed (HAProxy 2.6 drops the header from a body-less ``http-request return``,
#: ``hdr content-type`` included; ``http-after-response`` applies to its own replies too). Triton's replies, the
#: refusal service's and the refusal errorfiles carry it already, so the rule leaves them alone.
GRPC_CONTENT_TYPE_RULE = ("  http-after-response set-header content-type application/grpc if "
                          "{ res.hdr(grpc-status) -m found } !{ res.hdr(content-type) -m found }")
#: The refusal the frontend's rules chose (``txn.fd_code``: a gRPC status, or an HTTP status).
REFUSED = "{ var(txn.fd_code) -m found }"


def _refuse_lines(c: FrontDoorConfig, proto: str, at_once: str) -> list[str]:
    """Answer the refusal in ``txn.fd_code``/``txn.fd_msg``: by the refusal service while one of ``refusal_slots`` is
    free (a stick-table's ``conn_cur`` counts the refused requests whose uploads have not ended; HAProxy decrements it
    when a request ends, however it ends), else with ``at_once`` (an ``http-request return``)."""
    return [
        f"  http-request track-sc2 int(0) if {REFUSED}",
        f"  http-request use-service lua.recserve_refuse_{proto} if {REFUSED} {{ sc2_conn_cur le {c.refusal_slots} }}",
        f"  http-request return {at_once} if {REFUSED}",
    ]


def frontdoor_lines(c: FrontDoorConfig, proto: str, port: int, workdir: Path) -> list[str]:
    """Every line of frontend ``fe_<proto>`` before its routing (bind, timeouts, allow-list, size limit)."""
    if proto not in ("grpc", "http"):
        raise FrontDoorError(f"front door: proto must be grpc or http, got {proto!r}")
    c.validate()
    out = [
        bind_line(c, proto, port, workdir),
        f"  maxconn {c.maxconn}",
        f"  timeout http-request {_ms(c.timeout_http_request_s)}",
        f"  timeout http-keep-alive {_ms(c.timeout_keep_alive_s)}",
        f"  timeout client {_ms(c.timeout_client_s)}",
        # the refusals whose uploads go on (_refuse_lines)
        "  stick-table type integer size 1 store conn_cur",
    ]
    key = f" -m str -f {Path(c.admin_key_file).resolve()}" if c.admin_key_file else None
    if proto == "grpc":
        limit = c.max_grpc_body
        allowed = " ".join(GRPC_SERVICE + m for m in GRPC_ALLOWED)
        out += [f"  acl fd_allowed path {allowed}",
                f"  acl fd_stats path {GRPC_SERVICE}{GRPC_STATISTICS}"]
        out.append(f"  acl fd_key req.hdr({ADMIN_HEADER_GRPC}){key}" if key else "  acl fd_key always_false")
        out += [
            # the body first (or a full buffer), then the refusals, written by the refusal service: HAProxy's own
            # `return` reset a stream still uploading (RST_STREAM CANCEL) and the reply with it (curl: CANCEL, no
            # headers, in 17-19 of 30 tries at header time; every 16 MB request after a full buffer)
            f"  http-request wait-for-body time {_ms(c.timeout_http_request_s)}",
            "  http-request set-var(txn.fd_code) int(7) if !fd_allowed !fd_stats or fd_stats !fd_key",
            f'  http-request set-var-fmt(txn.fd_msg) "recserve front door: %[path] is not allowed ({ALLOWED_TEXT}; '
            f'statistics need the admin key)" if {REFUSED}',
            f"  http-request set-var(txn.fd_code) int(8) if !{REFUSED} {{ req.body_len gt {limit} }}",
            f'  http-request set-var-fmt(txn.fd_msg) "recserve front door: request body over the {limit} byte limit"'
            " if { var(txn.fd_code) -m int 8 }",
            *_refuse_lines(c, proto, "status 200 hdr grpc-status %[var(txn.fd_code)] hdr grpc-message "
                                     '"%[var(txn.fd_msg)]"'),
            GRPC_CONTENT_TYPE_RULE,
        ]
        return out
    limit = c.max_http_body
    out += [f"  acl fd_read path_reg {' '.join(HTTP_READ)}",
            f"  acl fd_infer path_reg {' '.join(HTTP_INFER)}",
            f"  acl fd_stats path_reg {' '.join(HTTP_STATISTICS)}"]
    out.append(f"  acl fd_key req.hdr({ADMIN_HEADER_HTTP}){key}" if key else "  acl fd_key always_false")
    text = "content-type text/plain lf-string"
    too_big = f"recserve front door: request body over the {limit} byte limit"
    # KServe v2's error body: tritonclient shows its words (a text body read as "Parse error at offset 0")
    json_413 = f'status 413 content-type application/json lf-string "{{\\"error\\":\\"{too_big}\\"}}"'
    declared_over = f"{{ req.hdr(content-length) -m int gt {limit} }}"
    out += [
        f'  http-request return status 403 {text} "recserve front door: %[method] %[path] is not allowed: '
        f'statistics need the admin key\\n" if fd_stats !fd_key',
        f'  http-request return status 403 {text} "recserve front door: %[path] is not allowed: {ALLOWED_TEXT}\\n"'
        " if !fd_read !fd_infer !fd_stats",
        f'  http-request return status 405 {text} "recserve front door: %[method] %[path] is not allowed: '
        'inference takes POST, health and metadata take GET\\n"'
        " if fd_infer !METH_POST or fd_read !METH_GET or fd_stats !METH_GET",
        # a client waiting for "100 Continue" has sent no body: refused at once, it sends none
        f"  http-request return {json_413} if {declared_over} {{ req.hdr(expect) -m str -i 100-continue }}",
        f"  http-request set-var(txn.fd_code) int(413) if {declared_over}",
        f"  http-request wait-for-body time {_ms(c.timeout_http_request_s)} at-least {limit + 1} if !{REFUSED}",
        f"  http-request set-var(txn.fd_code) int(413) if {{ req.body_len gt {limit} }}",
        f'  http-request set-var-fmt(txn.fd_msg) "{too_big}" if {REFUSED}',
        *_refuse_lines(c, proto, json_413),
    ]
    return out
