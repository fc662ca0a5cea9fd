"""HAProxy in front of the Triton fleet: one class owns one haproxy process, its generated config and its
runtime API, so every routing change after start is a runtime command, never a reload.

Layout (see ``shared/notes/runtime.md`` for why each setting is there):

* A fixed number of server *slots* per backend (instances are bound to slots at runtime with
  ``set server ... addr``); unused slots sit in maintenance.
* ``be_<proto>_first_<k>`` (``balance first``): slot ``k`` listed first, the others after it as normal servers, so
  all traffic goes to the primary in slot ``k`` and HAProxy retries/redispatches to the standby when it dies.
  Promoting another slot = pointing the route map at another ``first`` backend.
* ``be_<proto>_split`` (``balance roundrobin``): per-server weights for canary traffic shifting.
* ``chk``: the only servers with health checks; every other server ``track``s its slot there, so one
  ``set server chk/sN state maint`` takes an instance out of every backend at once.
* The frontends pick the backend through a map file (``set map``); what clients may send, how big and where they
  connect is the front door's (``control/routing/frontdoor.py``: an allow-list, size limits, bind address, TLS).

**Cluster mode** (``HAProxyConfig.cluster``, rendered for Kubernetes by ``control/kube/frontdoor.py``): the same
front door, admission, degraded-answer and refusal backends, access log and timeouts; instead of slots bound by a
control plane, one ``be_<proto>_pool`` backend whose servers (a ``server-template``, written out) are filled by
HAProxy's own DNS resolver from a headless Service that lists only Triton pods whose golden readiness gate is open
(``init-addr none``: empty slots wait in maintenance, a pod that leaves the answer goes back there), re-resolved every
check interval; the degraded-answer server is found the same way.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from recserve.control.defaults import FALLBACK_MAXCONN, FALLBACK_QUEUE, GRPC_PORT, HTTP_PORT, LOOPBACK, SLOTS
from recserve.control.routing.frontdoor import (
    FrontDoorConfig,
    FrontDoorError,
    frontdoor_lines,
    global_lines,
    prepare_files,
)
from recserve.control.runtime.process import ManagedProcess, ProcessError
from recserve.control.runtime.procs import port_in_use, port_listening
from recserve.control.testswitch import broken

PROTOS = ("grpc", "http")
#: Placeholder address of an unused slot (never contacted: unused slots are in maintenance).
_PLACEHOLDER_PORT = 9


@dataclass
class InitialRouting:
    """What a (re)started HAProxy serves from its first accepted connection, written into its config: the
    instances that take traffic (slot -> gRPC and HTTP ports), the pool's members, per-slot limits and canary
    weights, and the degraded-answer server. Servers in the config start UP; bound at runtime they would wait
    in maintenance, then for their health checks' ``rise``, and a client reconnecting after a HAProxy restart
    would be refused meanwhile (proxy-crash drill). The Router's ``restore()`` still runs after the start."""

    slots: dict[int, tuple[int, int]] = field(default_factory=dict)
    pool: set[int] = field(default_factory=set)
    limits: dict[int, int] = field(default_factory=dict)
    weights: dict[int, int] = field(default_factory=dict)
    fallback: tuple[int, int] | None = None


class HAProxyError(RuntimeError):
    """HAProxy could not start, or a runtime API command was refused (the message quotes HAProxy)."""


#: A DNS name as Kubernetes writes Service FQDNs (lower case labels).
DNS_NAME = r"^(?=.{1,253}$)([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*$"


@dataclass
class ClusterMode:
    """Where a front-door replica on Kubernetes finds its servers (``HAProxyConfig.cluster``). Names are FQDNs:
    HAProxy's resolvers apply no search domains."""

    #: The headless Service listing only Triton pods whose readiness gate is open (no publishNotReadyAddresses).
    pods_fqdn: str
    pod_grpc_port: int = GRPC_PORT
    pod_http_port: int = HTTP_PORT
    #: The degraded-answer server's headless Service; None: no degraded answers, shed requests are refused.
    fallback_fqdn: str | None = None
    fallback_slots: int = 2
    fallback_grpc_port: int = GRPC_PORT
    fallback_http_port: int = HTTP_PORT
    #: Nameservers as ``ip:port``; empty: the pod's /etc/resolv.conf (the cluster DNS), ``parse-resolv-conf``.
    nameservers: tuple[str, ...] = ()
    #: Where the stats socket and the pid file go (the config directory is a read-only ConfigMap on a pod).
    run_dir: Path | None = None
    #: Longest soft stop (``hard-stop-after``): in-flight requests get this long after SIGUSR1, then HAProxy exits.
    hard_stop_after_s: int = 30

    def validate(self) -> None:
        import ipaddress
        import re

        for name in ("pods_fqdn", "fallback_fqdn"):
            v = getattr(self, name)
            if v is not None and not re.match(DNS_NAME, v):
                raise HAProxyError(f"haproxy cluster: {name} {v!r} is not a DNS name")
        for name in ("pod_grpc_port", "pod_http_port", "fallback_grpc_port", "fallback_http_port"):
            if not 1 <= getattr(self, name) <= 65535:
                raise HAProxyError(f"haproxy cluster: {name} must be 1..65535, got {getattr(self, name)}")
        if not 1 <= self.fallback_slots <= 16:
            raise HAProxyError(f"haproxy cluster: fallback_slots must be 1..16, got {self.fallback_slots}")
        if self.hard_stop_after_s < 1:
            raise HAProxyError(f"haproxy cluster: hard_stop_after_s must be >= 1, got {self.hard_stop_after_s}")
        for ns in self.nameservers:
            host, _, port = ns.rpartition(":")
            try:
                ipaddress.ip_address(host.strip("[]"))
                ok = 1 <= int(port) <= 65535
            except ValueError:
                ok = False
            if not ok:
                raise HAProxyError(f"haproxy cluster: nameserver {ns!r} must be ip:port")


@dataclass
class HAProxyConfig:
    """Typed settings of the generated config; validated before anything is written."""

    workdir: Path
    grpc_port: int = GRPC_PORT
    http_port: int = HTTP_PORT
    host: str = LOOPBACK
    slots: int = SLOTS
    check_inter_ms: int = 200
    check_fall: int = 2
    check_rise: int = 2
    timeout_connect_ms: int = 200
    timeout_server_ms: int = 1000
    timeout_check_ms: int = 150
    timeout_client_s: int = 30
    #: At most one retry, and ``option redispatch`` sends it to ANOTHER server (docs/peak-traffic.md "Retries and
    #: timeouts").
    retries: int = 1
    #: HAProxy's built-in Prometheus exporter on this port (GET /metrics); 0 = no exporter.
    metrics_port: int = 0
    #: The client frontends' rules: bind address, TLS, allow-list, size limits, timeouts (control/routing/frontdoor.py).
    frontdoor: FrontDoorConfig = field(default_factory=FrontDoorConfig)
    #: Per-server in-flight limit at start (``maxconn``; for h2 servers it counts streams); the Router moves it
    #: at runtime with ``set maxconn server``.
    maxconn: int = 64
    #: In-flight limit of the degraded-answer fallback server (its own backend).
    fallback_maxconn: int = FALLBACK_MAXCONN
    #: Shed requests that may wait for a free fallback slot (a burst, such as every client reconnecting at once
    #: after a HAProxy restart, gets degraded answers rather than refusals); beyond it: the refusal at once.
    fallback_queue: int = FALLBACK_QUEUE
    #: Longest such wait; then HAProxy's 503 is rewritten into the refusal (``overloaded_reply``), never a
    #: 503, which gRPC clients would see as UNAVAILABLE and retry.
    fallback_timeout_queue_ms: int = 100
    #: Longest wait for a free server slot once admitted; the admission ACL refuses before a request queues, so
    #: this only bounds the race between the ACL and the dispatch. A request that loses that race was admitted:
    #: it waits for a slot as long as a server may take to answer (the default ``timeout server`` at the 50 ms
    #: SLO), not 50 ms, after which HAProxy's 503 reached gRPC clients as UNAVAILABLE, a failure no shed
    #: accounts for (the smoke overload drill in a clean-clone CI run: 2 "503 sQ" of 4000 requests).
    timeout_queue_ms: int = 200
    #: Requests that may wait in one data-path server's own queue. HAProxy's balancers skip a server at its
    #: ``maxconn`` unless its queue has room, and a retry redispatched away from a server that died (refusing
    #: connections, not yet marked down) falls back to that dead server when every other one is full: 503 "SC" at
    #: the client. With room here, the retry waits (``timeout_queue_ms``) for a slot of a server that lives. The
    #: admission ACL counts free slots only (``be_conn_free``), never queue room, so it refuses as before.
    #: Measured: crash-at-peak at 1.5x the knee, 8 "503 SC" of 4559 requests in HAProxy's log, each retried once
    #: to the same dead server.
    server_maxqueue: int = 64
    #: Access log (timers Tq/Tw/Tc/Tr/Tt/Ta, retries, unique request id) to ``access.log`` in the workdir.
    access_log: bool = True
    #: Routing written into the config at start (a restart); None: every slot starts unbound, in maintenance.
    initial: InitialRouting | None = None
    #: Kubernetes: servers from DNS instead of slots bound at runtime (``ClusterMode``); None: one host.
    cluster: ClusterMode | None = None
    #: Models whose shed requests get the refusal at once, never the degraded-answer server: a serving spec's
    #: models without ``degraded`` (``no_degraded_lines``). Empty: every shed request may get a degraded answer.
    no_degraded_models: tuple[str, ...] = ()

    def validate(self) -> None:
        for name in ("grpc_port", "http_port"):
            port = getattr(self, name)
            if not 1 <= port <= 65535:
                raise HAProxyError(f"haproxy config: {name} must be 1..65535, got {port}")
        try:
            self.frontdoor.validate()
        except FrontDoorError as exc:
            raise HAProxyError(str(exc)) from None
        if self.grpc_port == self.http_port:
            raise HAProxyError(f"haproxy config: grpc_port and http_port must differ, both are {self.grpc_port}")
        if not 1 <= self.slots <= 16:
            raise HAProxyError(f"haproxy config: slots must be 1..16, got {self.slots}")
        for name in ("check_inter_ms", "check_fall", "check_rise", "timeout_connect_ms", "timeout_server_ms",
                     "timeout_check_ms", "timeout_client_s", "retries", "maxconn", "fallback_maxconn",
                     "timeout_queue_ms", "fallback_timeout_queue_ms", "server_maxqueue"):
            if getattr(self, name) <= 0:
                raise HAProxyError(f"haproxy config: {name} must be > 0, got {getattr(self, name)}")
        if self.fallback_queue < 0:
            raise HAProxyError(f"haproxy config: fallback_queue must be >= 0, got {self.fallback_queue}")
        if self.timeout_check_ms >= self.check_inter_ms:
            raise HAProxyError(
                f"haproxy config: timeout_check_ms ({self.timeout_check_ms}) must be below check_inter_ms "
                f"({self.check_inter_ms})"
            )
        if self.cluster is not None:
            self.cluster.validate()

    @property
    def config_path(self) -> Path:
        return self.workdir / "haproxy.cfg"

    @property
    def run_dir(self) -> Path:
        """Where HAProxy writes (stats socket, pid file): the workdir, or the cluster mode's ``run_dir``."""
        return self.cluster.run_dir if self.cluster is not None and self.cluster.run_dir else self.workdir

    @property
    def socket_path(self) -> Path:
        return self.run_dir / "haproxy.sock"

    @property
    def map_path(self) -> Path:
        return self.workdir / "routes.map"

    @property
    def pid_path(self) -> Path:
        return self.run_dir / "haproxy.pid"

    @property
    def access_log_path(self) -> Path:
        return self.workdir / "access.log"


def first_backend(proto: str, slot: int) -> str:
    return f"be_{proto}_first_{slot}"


def split_backend(proto: str) -> str:
    return f"be_{proto}_split"


def pool_backend(proto: str) -> str:
    """``balance leastconn`` over the active instances (active-active mode)."""
    return f"be_{proto}_pool"


def fallback_backend(proto: str) -> str:
    """The degraded-answer server (control/fallback/app.py): where shed requests go while it has room."""
    return f"be_{proto}_fallback"


def shed_backend(proto: str) -> str:
    """Server-less backend that writes admission's refusal; its session count is exactly the refusals (the
    frontend's ``intercepted`` counter also counts the front door's 403s, which are not load)."""
    return f"be_{proto}_shed"


def shed_backends() -> list[str]:
    """Where shed requests are counted: the degraded-answer and the refusal backends of both protocols."""
    return [b(p) for p in PROTOS for b in (fallback_backend, shed_backend)]


#: What a shed client reads: HTTP 429's body, and the grpc-message of gRPC's RESOURCE_EXHAUSTED.
OVERLOADED = "overloaded, retry later"
#: Access log line: request id, client, timers (Tq request, Tw queue, Tc connect, Tr server response, Tt total,
#: Ta active, all ms: Tq and Tt include the idle time before a request on a kept-alive connection, Ta does not),
#: status, bytes, retries (%rc, "+" prefix when redispatched), termination state (%tsc: who ended the request and
#: in which phase, e.g. "sQ--" = a server-side timeout while queued), concurrency and queues, request line.
ACCESS_LOG_FORMAT = ("%ID %ci:%cp [%tr] %ft %b/%s %Tq/%Tw/%Tc/%Tr/%Tt/%Ta %ST %B %rc %tsc "
                     "%ac/%fc/%bc/%sc %sq/%bq %{+Q}r")


def retry_defaults(c: HAProxyConfig) -> list[str]:
    """At most ``c.retries`` retries, redispatched to another server (test switch ``no-retries``: none)."""
    return ["  retries 0"] if broken("no-retries") else [f"  retries {c.retries}", "  option redispatch 1"]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def no_degraded_lines(proto: str, models: tuple[str, ...]) -> list[str]:
    """ACL ``no_degraded``: the request names a model without a degraded answer (its shed requests get the refusal).

    HTTP: the model in the path (``/v2/models/<m>[/versions/<v>][/ready|/infer|...]``). gRPC: the model is in the
    body, which the front door has already awaited (``wait-for-body``): every per-model call of KServe v2
    (``ModelInfer``, ``ModelMetadata``, ``ModelReady``) has the model's name as protobuf field 1, which protobuf
    encoders (tritonclient's, grpc-gateway's, Go's, Java's) write first, so the message starts
    ``0x0A <length varint> <name>`` after gRPC's 5-byte prefix (compression flag 0, length). A message that
    writes its fields in another order, or compresses, does not match and may reach the degraded-answer server,
    which refuses such a model's requests in the same words itself (``control/fallback/app.py``)."""
    if not models:
        return []
    if proto == "http":
        names = "|".join(re.sub(r"[^A-Za-z0-9_-]", lambda c: f"[{c.group()}]", m) for m in sorted(models))
        return [f"  acl no_degraded path_reg ^/v2/models/({names})(/.*)?$"]
    out = []
    for m in sorted(models):
        prefix = b"\x0a" + _varint(len(m.encode())) + m.encode()
        out.append(f"  acl no_degraded req.body,bytes(5,{len(prefix)}),hex -m str {prefix.hex().upper()}")
    return out


def admission_lines(c: HAProxyConfig, proto: str, backends: list[str]) -> list[str]:
    """Refuse at once when the routed backend has no free in-flight slot (``be_conn_free``; for a ``first``
    backend, its primary's), never queue.

    Order: the degraded-answer backend while it has room, then HAProxy's own reply: HTTP 429 (``OVERLOADED``)
    or, for gRPC, a Trailers-Only RESOURCE_EXHAUSTED (status 8), which client retry policies do not retry
    (a 503 would reach gRPC clients as UNAVAILABLE and be retried), written by ``shed_backend`` so that its
    session count is the number of refusals. Goes AFTER the front door's rules.
    """
    if c.cluster is not None:  # one route: the pool of pods the DNS answer lists
        out = [f"  http-request set-var(txn.route) str({pool_backend(proto)})"]
    else:
        out = [f"  http-request set-var(txn.route) str({proto}),map({c.map_path},{first_backend(proto, 0)})"]
    if broken("no-admission"):  # test switch: nothing is refused; a full server queues in HAProxy instead
        return [*out, "  use_backend %[var(txn.route)]"]
    for be in backends:
        out.append(f"  http-request set-var(txn.full) bool(1) if {{ var(txn.route) -m str {be} }} "
                   f"{{ be_conn_free({be}) le 0 }}")
    for k in range(c.slots if c.cluster is None else 0):
        # ``balance first``: be_conn_free also counts the standbys listed after the primary (normal servers, so
        # that a retry can be redispatched to one), and a full primary would overflow onto them: the pool is
        # full when the primary is up and has no free slot. Up as its health check says (``chk``): srv_is_up
        # of a tracking server is true whatever the tracked one's state (only maintenance counts).
        be = first_backend(proto, k)
        out.append(f"  http-request set-var(txn.full) bool(1) if {{ var(txn.route) -m str {be} }} "
                   f"{{ srv_is_up(chk/s{k}) }} {{ srv_conn_free({be}/s{k}) le 0 }}")
    fb = fallback_backend(proto)
    no_fb = no_degraded_lines(proto, c.no_degraded_models)
    unless = " !no_degraded" if no_fb else ""
    out += ["  acl pool_full var(txn.full) -m bool",
            f"  acl fallback_free be_conn_free({fb}) gt 0",
            (f"  acl fallback_up srv_is_up({fallback_backend('grpc')}/fb)" if c.cluster is None  # HTTP tracks it
             else f"  acl fallback_up nbsrv({fb}) gt 0"),
            f"  acl fallback_queue_room queue({fb}) lt {c.fallback_queue}",
            *no_fb,
            f"  use_backend {fb} if pool_full fallback_free{unless} "
            f"|| pool_full fallback_up fallback_queue_room{unless}",
            f"  use_backend {shed_backend(proto)} if pool_full",
            "  use_backend %[var(txn.route)]"]
    return out


def overloaded_reply(proto: str) -> bytes:
    """The refusal as a raw HTTP response (HAProxy ``errorfile``): admission's refusal (``refusal_lines``) and the
    503 HAProxy writes when a shed request's wait for a fallback slot runs out. HTTP: KServe v2's error body
    (``{"error": ...}``), so HTTP clients such as tritonclient show the words."""
    if proto == "grpc":
        head = ["HTTP/1.1 200 OK", "content-type: application/grpc", "grpc-status: 8",
                f"grpc-message: {OVERLOADED}", "content-length: 0"]
        body = b""
    else:
        body = f'{{"error":"{OVERLOADED}"}}'.encode()
        head = ["HTTP/1.1 429 Too Many Requests", "content-type: application/json", "retry-after: 1",
                f"content-length: {len(body)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def errorfile_path(c: HAProxyConfig, proto: str) -> Path:
    return c.workdir / f"overloaded-{proto}.http"


def refusal_lines(c: HAProxyConfig, proto: str) -> list[str]:
    """The refusal backend's one rule: HTTP 429 (``OVERLOADED``) or a gRPC Trailers-Only RESOURCE_EXHAUSTED, the
    response ``overloaded_reply`` writes. From a file because HAProxy drops a ``content-type`` of a reply with no
    body, and gRPC clients other than grpc-core's Python (Go, Java) take a reply without ``application/grpc``
    for a malformed one (UNKNOWN) instead of reading its grpc-status."""
    return [f"  http-request return errorfile {errorfile_path(c, proto)}"]


def render_config(c: HAProxyConfig) -> str:
    """The whole haproxy.cfg text for ``c``."""
    c.validate()
    ph = f"127.0.0.1:{_PLACEHOLDER_PORT}"
    init = c.initial or InitialRouting()

    def addr(slot: int, proto: str) -> str:
        ports = init.slots.get(slot)
        return f"127.0.0.1:{ports[0] if proto == 'grpc' else ports[1]}" if ports else ph

    def lim(slot: int) -> str:
        return f"maxconn {init.limits.get(slot, c.maxconn)} maxqueue {c.server_maxqueue}"
    head = ("# generated by recserve control plane (control/routing/haproxy.py); edits are overwritten at fleet-up"
            if c.cluster is None else
            "# generated by python -m recserve.control.kube.frontdoor (control/routing/haproxy.py, cluster mode)")
    out = [
        head,
        "global",
        f"  stats socket {c.socket_path} mode 600 level admin",
        f"  pidfile {c.pid_path}",
        "  log stderr format short local0 warning",
        *global_lines(c.frontdoor, c.workdir),
        *([] if c.cluster is None else [f"  hard-stop-after {c.cluster.hard_stop_after_s}s"]),
        "",
        "defaults",
        "  mode http",
        "  log global",
        f"  timeout connect {c.timeout_connect_ms}ms",
        f"  timeout client {c.timeout_client_s}s",
        f"  timeout server {c.timeout_server_ms}ms",
        f"  timeout check {c.timeout_check_ms}ms",
        f"  timeout queue {c.timeout_queue_ms}ms",
        *retry_defaults(c),
    ]
    if c.cluster is not None:
        return _render_cluster(c, out)
    out += [
        "",
        "backend chk",
        # Liveness, not readiness: with strict readiness Triton answers 400 on /v2/health/ready while an old
        # version unloads (~2 s) and for good after any failed load, which would take a serving instance out.
        # Crash and hang show on /live as fast; model-level health is the control plane's deep check (maint).
        "  option httpchk GET /v2/health/live",
        "  http-check expect status 200",
    ]
    chk = f"check check-proto h1 inter {c.check_inter_ms}ms fall {c.check_fall} rise {c.check_rise}"
    for s in range(c.slots):
        out.append(f"  server s{s} {addr(s, 'http')} {chk}" + ("" if s in init.slots else " disabled"))
    for proto in PROTOS:
        bind_port = c.grpc_port if proto == "grpc" else c.http_port
        srv_proto = " proto h2" if proto == "grpc" else ""
        backends = ([first_backend(proto, k) for k in range(c.slots)]
                    + [split_backend(proto), pool_backend(proto)])
        out += [
            "",
            f"frontend fe_{proto}",
            # Allow-list, size limits, timeouts, bind address and TLS: control/routing/frontdoor.py. A 403 reaches gRPC
            # clients as PERMISSION_DENIED, which no retry policy retries, and never costs an instance a parse.
            *frontdoor_lines(c.frontdoor, proto, bind_port, c.workdir),
        ]
        if c.access_log:
            out += ["  no log", "  log stdout format raw local0 info", "  unique-id-format %[uuid()]",
                    f'  log-format "{ACCESS_LOG_FORMAT}"']
        out += admission_lines(c, proto, backends)
        out.append(f"  default_backend {first_backend(proto, 0)}")
        # No 503 here: Triton's own queue-full answer is 503, and retrying an overload multiplies it.
        retry = [] if broken("no-retries") else ["  retry-on conn-failure empty-response response-timeout"]
        for k in range(c.slots):
            order = [k] + [s for s in range(c.slots) if s != k]
            out += ["", f"backend {first_backend(proto, k)}", "  balance first", *retry]
            for i, s in enumerate(order):
                out.append(f"  server s{s} {addr(s, proto)}{srv_proto} track chk/s{s} id {i + 1} {lim(s)}")
        out += ["", f"backend {split_backend(proto)}", "  balance roundrobin", *retry]
        for s in range(c.slots):
            out.append(f"  server s{s} {addr(s, proto)}{srv_proto} track chk/s{s} weight {init.weights.get(s, 0)} "
                       f"{lim(s)}")
        out += ["", f"backend {pool_backend(proto)}", "  balance leastconn", *retry]
        for s in range(c.slots):
            out.append(f"  server s{s} {addr(s, proto)}{srv_proto} track chk/s{s} {lim(s)}"
                       + ("" if s in init.pool or s not in init.slots else " disabled"))
        fb = init.fallback
        fb_addr = f"127.0.0.1:{fb[0] if proto == 'grpc' else fb[1]}" if fb else ph
        fb_check = (f"check check-proto h1 inter {c.check_inter_ms * 2}ms fall {c.check_fall} "
                    f"rise {c.check_rise}" + (f" port {fb[1]}" if fb else " disabled")
                    if proto == "grpc" else f"track {fallback_backend('grpc')}/fb")
        chk_lines = (["  option httpchk GET /v2/health/ready", "  http-check expect status 200"]
                     if proto == "grpc" else [])
        out += ["", f"backend {fallback_backend(proto)}", "  retry-on conn-failure empty-response", *chk_lines,
                f"  timeout queue {c.fallback_timeout_queue_ms}ms",
                # a shed request whose degraded answer did not come (no slot in time: 503; the degraded-answer
                # server itself slower than the server timeout under the burst: 504) gets admission's refusal,
                # never a 5xx that gRPC clients read as UNAVAILABLE and retry
                f"  errorfile 503 {errorfile_path(c, proto)}",
                f"  errorfile 504 {errorfile_path(c, proto)}",
                f"  server fb {fb_addr}{srv_proto} maxconn {c.fallback_maxconn} {fb_check}"]
        out += ["", f"backend {shed_backend(proto)}", *refusal_lines(c, proto)]
    out += _metrics_lines(c)
    return "\n".join(out) + "\n"


def _metrics_lines(c: HAProxyConfig) -> list[str]:
    if not c.metrics_port:
        return []
    # Prometheus scrapes the data path as clients see it (Debian's 2.6 has the exporter); on a cluster the same
    # frontend answers the kubelet's probes (/healthz: this HAProxy accepts; it stops listening at a soft stop)
    health = ["  http-request return status 200 content-type text/plain string ok if { path /healthz }"]
    return ["", "frontend fe_metrics", f"  bind {c.host}:{c.metrics_port}", "  no log",
            *(health if c.cluster is not None else []),
            "  http-request use-service prometheus-exporter if { path /metrics }",
            "  http-request deny deny_status 404"]


def _dns_servers(prefix: str, n: int, rest: str) -> list[str]:
    """``server-template <prefix> <n> <rest>`` written out as ``n`` servers sharing one DNS name (HAProxy gives each
    a different address of the answer, as it does a template's). Written out because HAProxy 2.6's template loses
    ``check-proto`` on its servers 2..n: their HTTP/1 health checks went out as HTTP/2 to Triton's HTTP port and
    timed out, taking every pod but the first out of a gRPC backend (tests/test_kube_frontdoor.py found it)."""
    return [f"  server {prefix}{i} {rest}" for i in range(1, n + 1)]


def _render_cluster(c: HAProxyConfig, out: list[str]) -> str:
    """The rest of ``render_config`` in cluster mode (``c.cluster``): a ``resolvers`` section, and per protocol the
    front door, admission and access log exactly as on one host, one pool backend whose ``c.slots`` servers come
    from the pods' DNS answer (a ``server-template`` written out:
    ``_dns_servers``; re-resolved every check interval), the degraded-answer backend
    found the same way and the refusal backend. Each server's ``maxconn`` is this replica's share of the pod's
    in-flight limit (``c.maxconn``, control/kube/frontdoor.py)."""
    k = c.cluster
    assert k is not None
    inter = c.check_inter_ms
    ns = ([f"  nameserver dns{i} {n}" for i, n in enumerate(k.nameservers)] if k.nameservers
          else ["  parse-resolv-conf"])
    out += [
        "",
        # A pod's address comes and goes with the headless Service's answer: re-asked every check interval (hold
        # valid), an address that left the answer is dropped at once (hold obsolete 0s): its slot goes to
        # maintenance, its in-flight requests finish.
        "resolvers cluster",
        *ns,
        "  accepted_payload_size 8192",
        "  resolve_retries 3",
        f"  timeout resolve {inter}ms",
        f"  timeout retry {inter}ms",
        f"  hold valid {inter}ms",
        "  hold obsolete 0s",
        *[f"  hold {s} {inter}ms" for s in ("nx", "other", "refused", "timeout")],
    ]
    chk = f"check inter {inter}ms fall {c.check_fall} rise {c.check_rise}"
    dns = "resolvers cluster init-addr none resolve-prefer ipv4"
    for proto in PROTOS:
        bind_port = c.grpc_port if proto == "grpc" else c.http_port
        srv_proto = " proto h2" if proto == "grpc" else ""
        pool = pool_backend(proto)
        out += ["", f"frontend fe_{proto}", *frontdoor_lines(c.frontdoor, proto, bind_port, c.workdir)]
        if c.access_log:
            out += ["  no log", "  log stdout format raw local0 info", "  unique-id-format %[uuid()]",
                    f'  log-format "{ACCESS_LOG_FORMAT}"']
        out += admission_lines(c, proto, [pool])
        out.append(f"  default_backend {pool}")
        retry = [] if broken("no-retries") else ["  retry-on conn-failure empty-response response-timeout"]
        port = k.pod_grpc_port if proto == "grpc" else k.pod_http_port
        out += ["", f"backend {pool}", "  balance leastconn", *retry,
                # liveness, as on one host: the golden gate (the DNS answer) already says the versions answer right
                "  option httpchk GET /v2/health/live", "  http-check expect status 200",
                *_dns_servers("pod", c.slots, f"{k.pods_fqdn}:{port}{srv_proto} {dns} maxconn {c.maxconn} "
                              f"maxqueue {c.server_maxqueue} {chk} check-proto h1 port {k.pod_http_port}")]
        fb = fallback_backend(proto)
        out += ["", f"backend {fb}", "  retry-on conn-failure empty-response",
                "  option httpchk GET /v2/health/ready", "  http-check expect status 200",
                f"  timeout queue {c.fallback_timeout_queue_ms}ms",
                f"  errorfile 503 {errorfile_path(c, proto)}",
                f"  errorfile 504 {errorfile_path(c, proto)}"]
        if k.fallback_fqdn:
            fport = k.fallback_grpc_port if proto == "grpc" else k.fallback_http_port
            out += _dns_servers("fb", k.fallback_slots, f"{k.fallback_fqdn}:{fport}{srv_proto} {dns} "
                                f"maxconn {c.fallback_maxconn} check inter {inter * 2}ms fall {c.check_fall} "
                                f"rise {c.check_rise} check-proto h1 port {k.fallback_http_port}")
        out += ["", f"backend {shed_backend(proto)}", *refusal_lines(c, proto)]
    out += _metrics_lines(c)
    return "\n".join(out) + "\n"


#: Words in a runtime API answer that mean HAProxy refused the command.
RUNTIME_ERROR_WORDS = ("unknown command", "no such", "require", "invalid", "not found", "error", "permission denied")


def runtime_exchange(address: Path | str | tuple[str, int], cmd: str, timeout_s: float = 2.0,
                     check: bool = True) -> str:
    """One runtime API command, one connection (HAProxy answers and closes): ``address`` is the stats socket's
    path or a (host, port) of a TCP listener. HAProxyError names the address and quotes HAProxy's refusal
    (``check``: off for tables, whose column names contain words such as "errors")."""
    where = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
    try:
        tcp = isinstance(address, tuple)
        conn = socket.create_connection(address, timeout=timeout_s) if tcp else socket.socket(socket.AF_UNIX)
        with conn:
            conn.settimeout(timeout_s)
            if not tcp:
                conn.connect(str(address))
            conn.sendall(cmd.encode() + b"\n")
            chunks = []
            while data := conn.recv(65536):
                chunks.append(data)
    except OSError as exc:
        raise HAProxyError(f"haproxy runtime API {where} '{cmd}': {exc}") from exc
    text = b"".join(chunks).decode(errors="replace")
    if check and any(w in text.lower() for w in RUNTIME_ERROR_WORDS):
        raise HAProxyError(f"haproxy {where} refused '{cmd}': {text.strip()}")
    return text


def parse_stat(text: str) -> list[dict[str, str]]:
    """Rows of ``show stat``'s CSV, keyed by its ``# pxname,svname,...`` header; [] without that header."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines or not lines[0].startswith("# "):
        return []
    header = lines[0][2:].split(",")
    return [dict(zip(header, ln.split(","), strict=False)) for ln in lines[1:]]


class HAProxy:
    """Owns one haproxy process (or adopts a running one through its pid file) and its stats socket."""

    def __init__(self, config: HAProxyConfig):
        self.config = config
        self._proc = self._managed()

    def _managed(self) -> ManagedProcess:
        """The haproxy process: frontends log requests to stdout (the access log), haproxy itself to stderr; it
        writes its own pid file (``pidfile`` in its config); an adopted pid must be running this config."""
        c = self.config
        return ManagedProcess("haproxy", log_path=c.workdir / "haproxy.log", stdout_path=c.access_log_path,
                              pid_path=c.pid_path, marker=str(c.config_path))

    # ------------------------------------------------------------------ lifecycle
    @property
    def process(self) -> subprocess.Popen | None:
        """The haproxy process this object started (None when adopted or not running)."""
        return self._proc.popen

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def is_alive(self) -> bool:
        return self._proc.alive()

    def adopt(self) -> bool:
        """Attach to a haproxy started earlier (pid file + its command line naming our config + answering
        socket); True when adopted."""
        if not self._proc.adopt():
            return False
        try:
            self.command("show info")
        except HAProxyError:
            self._proc.forget()
            return False
        return True

    def forget(self) -> None:
        """Drop the handle on a haproxy that is gone (reaping it when it was ours) so ``start()`` begins afresh:
        what the Router's supervision does before it starts a dead HAProxy again."""
        if self.is_alive():
            raise HAProxyError(f"haproxy (pid {self.pid}) is still running: stop it, do not forget it")
        self._proc.forget()

    def start(self, timeout_s: float = 10.0) -> HAProxy:
        c = self.config
        binary = shutil.which("haproxy")
        if binary is None:
            raise HAProxyError("haproxy not found on PATH: run 'make setup' (installs Debian's haproxy)")
        for name in ("grpc_port", "http_port"):
            if port_in_use(getattr(c, name), c.frontdoor.bind):
                port = getattr(c, name)
                raise HAProxyError(f"haproxy: {name.replace('_', ' ')} {port} is already in use on {c.frontdoor.bind}")
        c.workdir.mkdir(parents=True, exist_ok=True)
        prepare_files(c.frontdoor, c.workdir)
        for proto in PROTOS:
            errorfile_path(c, proto).write_bytes(overloaded_reply(proto))
        c.config_path.write_text(render_config(c))
        if not c.map_path.exists():
            c.map_path.write_text(f"grpc {first_backend('grpc', 0)}\nhttp {first_backend('http', 0)}\n")
        check = subprocess.run([binary, "-c", "-f", str(c.config_path)], capture_output=True, text=True)
        if check.returncode != 0:
            raise HAProxyError(f"haproxy rejected {c.config_path}: {check.stdout}{check.stderr}")
        self._proc = self._managed()
        self._proc.argv = [binary, "-W", "-db", "-f", str(c.config_path)]
        self._proc.start()
        try:
            self._proc.wait_ready(self._answers, timeout_s, interval_s=0.05, stop=False)
        except ProcessError as exc:
            if exc.timed_out:
                self.stop()
                raise HAProxyError(f"haproxy not ready after {timeout_s}s; see {c.workdir}/haproxy.log") from None
            raise HAProxyError(f"haproxy exited at start (code {exc.code}); see {c.workdir}/haproxy.log") from None
        return self

    def _answers(self) -> bool:
        """Listening on the client port and answering on the stats socket."""
        c = self.config
        if not (c.socket_path.exists() and port_listening(c.grpc_port, c.frontdoor.bind)):
            return False
        try:
            self.command("show info")
            return True
        except HAProxyError:
            return False

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM haproxy's process group, SIGKILL after ``timeout_s``; removes its socket and pid file."""
        if self._proc.pid is None:
            return
        self._proc.stop(timeout_s, kill_wait_s=5)
        self._proc.forget()
        for p in (self.config.socket_path, self.config.pid_path):
            p.unlink(missing_ok=True)

    # ------------------------------------------------------------------ runtime API
    def command(self, cmd: str, timeout_s: float = 2.0, check: bool = True) -> str:
        """Send one runtime API command over the stats socket; raise on HAProxy's error answers (``check``:
        off for tables, whose column names contain words such as "errors")."""
        return runtime_exchange(self.config.socket_path, cmd, timeout_s, check)

    def commands(self, cmds: list[str], timeout_s: float = 2.0) -> str:
        """Several runtime API commands on one connection (``;``-separated, HAProxy runs them in order): one round
        trip instead of one per command, so a routing change lands in one step; raises as ``command`` does."""
        if any(";" in c or "\\" in c for c in cmds):
            raise HAProxyError(f"runtime API commands must not contain ';' or a backslash: {cmds!r}")
        return self.command("; ".join(cmds), timeout_s) if cmds else ""

    def _all_backends(self) -> list[str]:
        firsts = [first_backend(p, k) for p in PROTOS for k in range(self.config.slots)]
        return firsts + [split_backend(p) for p in PROTOS] + [pool_backend(p) for p in PROTOS]

    def bind_slot(self, slot: int, grpc_port: int, http_port: int) -> None:
        """Point ``slot`` at an instance's ports in every backend (still in maintenance until ``set_state``)."""
        self._check_slot(slot)
        self.command(f"set server chk/s{slot} addr 127.0.0.1 port {http_port}")
        self.command(f"set server chk/s{slot} check-port {http_port}")
        for be in self._all_backends():
            port = grpc_port if be.startswith("be_grpc") else http_port
            self.command(f"set server {be}/s{slot} addr 127.0.0.1 port {port}")

    def set_state(self, slot: int, state: str, pool_state: str | None = None) -> None:
        """``ready``, ``drain`` or ``maint`` for the instance in ``slot`` (every backend follows via track);
        ``pool_state`` overrides it in the active-active pool backends (an instance out of the pool)."""
        self._check_slot(slot)
        for st in (state, pool_state or state):
            if st not in ("ready", "drain", "maint"):
                raise HAProxyError(f"server state must be ready, drain or maint, got {st!r}")
        # Trackers inherit maint/drain from chk only partly; set them explicitly so every backend agrees.
        self.commands([f"set server chk/s{slot} state {state}"]
                      + [f"set server {be}/s{slot} state {(pool_state or state) if be.endswith('_pool') else state}"
                         for be in self._all_backends()])

    def set_maxconn(self, slot: int, limit: int) -> None:
        """The in-flight limit of ``slot`` in every traffic backend (h2: concurrent streams)."""
        self._check_slot(slot)
        if not 1 <= limit <= 100000:
            raise HAProxyError(f"maxconn must be 1..100000, got {limit}")
        self.commands([f"set maxconn server {be}/s{slot} {limit}" for be in self._all_backends()])

    def bind_fallback(self, grpc_port: int, http_port: int) -> None:
        """Point the degraded-answer backends at the fallback server and enable its health check."""
        self.command(f"set server {fallback_backend('grpc')}/fb addr 127.0.0.1 port {grpc_port}")
        self.command(f"set server {fallback_backend('grpc')}/fb check-port {http_port}")
        self.command(f"set server {fallback_backend('http')}/fb addr 127.0.0.1 port {http_port}")
        for p in PROTOS:
            self.command(f"set server {fallback_backend(p)}/fb state ready")

    def stat(self) -> list[dict[str, str]]:
        """``show stat`` rows (pxname, svname, scur, qcur, slim, stot, status, ...), one per proxy/server."""
        return parse_stat(self.command("show stat", check=False))

    def set_weight(self, slot: int, weight: int) -> None:
        """Weight of ``slot`` in the split (canary) backends, 0..256."""
        self._check_slot(slot)
        if not 0 <= weight <= 256:
            raise HAProxyError(f"weight must be 0..256, got {weight}")
        for p in PROTOS:
            self.command(f"set server {split_backend(p)}/s{slot} weight {weight}")

    def route(self, backend_kind: str, slot: int = 0) -> None:
        """Send clients to ``first`` (primary in ``slot``), ``split`` (weights) or ``pool`` (leastconn)."""
        if backend_kind not in ("first", "split", "pool"):
            raise HAProxyError(f"route must be 'first', 'split' or 'pool', got {backend_kind!r}")
        lines = []
        for p in PROTOS:
            be = {"split": split_backend(p), "pool": pool_backend(p)}.get(backend_kind) or first_backend(p, slot)
            self.command(f"set map {self.config.map_path} {p} {be}")
            lines.append(f"{p} {be}")
        tmp = self.config.map_path.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, self.config.map_path)

    def current_route(self) -> str:
        text = self.command(f"show map {self.config.map_path}")
        for line in text.splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[1] == "grpc":
                return parts[2]
        return first_backend("grpc", 0)

    def servers(self) -> dict[str, dict[str, str]]:
        """``backend/server`` -> fields of ``show servers state`` (operational and admin state, weight...)."""
        text = self.command("show servers state")
        header = None
        out: dict[str, dict[str, str]] = {}
        for ln in text.splitlines():
            if ln.startswith("# be_id"):
                header = ln[2:].split()
                continue
            if header and ln and ln[0].isdigit():
                row = dict(zip(header, ln.split(), strict=False))
                out[f"{row['be_name']}/{row['srv_name']}"] = row
        return out

    def slot_up(self, slot: int) -> bool:
        """HAProxy's own view of the slot's health check (operational state 2 = running)."""
        row = self.servers().get(f"chk/s{slot}")
        return bool(row) and row.get("srv_op_state") == "2"

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.config.slots:
            raise HAProxyError(f"slot must be 0..{self.config.slots - 1}, got {slot}")

