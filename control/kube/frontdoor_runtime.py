"""The operator programs every front-door replica through HAProxy's runtime API (issue 21 item 1).

Each replica's config (control/kube/frontdoor.py) opens the runtime API on a TCP port (``RUNTIME_PORT``, ``stats
socket ipv4@0.0.0.0:9999 level admin``) that a NetworkPolicy opens to the operator's pods only. On every reconcile
the operator lists the front-door pods (label ``app.kubernetes.io/name=recserve-frontdoor``; a replica is a Running
pod with an IP) and, on each one:

* **admission**: ``set maxconn server`` on every pod slot of both pool backends to the pod limit (the ConfigMap's
  ``recserve.io/pod-limit``, or the one from a knee measured in the cluster: control/kube/knee.py) divided by the
  number of replicas there are NOW (terminating ones still count: they hold requests while they drain), and the
  degraded-answer server's ``recserve.io/fallback-limit`` likewise; a
  replica the HPA adds starts with the rendered share (divided by ``minReplicas``) and is re-divided within one
  reconcile interval, as are the others;
* **per pod**: the slots are written-out servers ``pod1..podN`` sharing one DNS name, and which slot holds which
  Triton pod is HAProxy's choice, different on every replica. So a pod is addressed by its IP: the operator reads
  ``show servers state`` of the pool backends (``srv_addr`` of every slot not in resolution maintenance) and sends
  the pod's settings to the slot that holds its IP on that replica: ``state drain`` while its golden gate is closed
  (at once, before the DNS answer drops it), ``state ready`` and its ``weight`` otherwise: 1 when no rollout splits
  traffic, the rollout's percentages during a canary step (canary ``pct``, primary ``100 - pct``). A slot whose IP
  is no pod the operator knows, or that is empty, goes back to the rendered values (ready, weight 1), so a pod the
  DNS answer later puts there does not inherit another pod's drain or weight.

Idempotent: the replica's state is read first (``show servers state`` and ``show stat``'s ``slim``) and only what
differs is sent, so a pass over programmed replicas sends two reads each. A replica that cannot be read or refuses
a command is reported (``ReplicaResult.error``), never skipped in silence: the operator turns it into an Event on
that pod and the fleet's Degraded condition (reason ``FrontDoorNotProgrammed``).

What weights mean here: the pool backends ``balance leastconn``, which HAProxy weighs by in-flight requests over
weight. The percentages hold while requests overlap (under load, where a canary's share matters); with one request
at a time every server is at zero and HAProxy takes them in turn whatever their weights.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from recserve.control.routing.haproxy import PROTOS, HAProxyError, fallback_backend, pool_backend, runtime_exchange

#: HAProxy's runtime API on each front-door replica (TCP; the NetworkPolicy admits only the operator).
RUNTIME_PORT = 9999
#: The front-door ConfigMap's annotations the operator programs from (control/kube/frontdoor.py writes them).
POD_LIMIT_ANNOTATION = "recserve.io/pod-limit"
FALLBACK_LIMIT_ANNOTATION = "recserve.io/fallback-limit"
RUNTIME_PORT_ANNOTATION = "recserve.io/runtime-api-port"
#: The front-door pods (its Deployment's selector).
FRONTDOOR_LABELS = {"app.kubernetes.io/name": "recserve-frontdoor"}
#: HAProxy's server admin-state bits (``show servers state``'s ``srv_admin_state``, HAProxy 2.6 server-t.h).
ADMF_FDRAIN = 0x08
ADMF_RMAINT = 0x20
#: The weight of a pod slot in the rendered config (no ``weight`` keyword): every pod alike.
DEFAULT_WEIGHT = 1


def runtime_command(host: str, port: int, cmd: str, timeout_s: float = 2.0, check: bool = True) -> str:
    """One runtime API command to a replica's TCP listener (routing.haproxy.runtime_exchange: HAProxyError quotes
    HAProxy's refusal or names the address it cannot reach)."""
    return runtime_exchange((host, port), cmd, timeout_s, check)


@dataclass(frozen=True)
class PodTraffic:
    """What one Triton pod gets on every replica: served (gate open) with a weight, or drained."""

    serving: bool
    weight: int = DEFAULT_WEIGHT


@dataclass
class Plan:
    """The settings of one pass: the limits to divide and the pods by IP."""

    pod_limit: int
    fallback_limit: int
    pods: dict[str, PodTraffic] = field(default_factory=dict)
    #: Replicas the limits are divided by (all Running front-door pods, terminating ones included).
    replicas: int = 1

    def share(self) -> int:
        return max(1, self.pod_limit // max(1, self.replicas))

    def fallback_share(self) -> int:
        return max(1, self.fallback_limit // max(1, self.replicas))


@dataclass(frozen=True)
class Replica:
    name: str
    ip: str
    terminating: bool = False


@dataclass
class ReplicaResult:
    replica: Replica
    #: Commands sent this pass (empty when the replica already had the plan).
    sent: list[str] = field(default_factory=list)
    #: Why the replica is not programmed ("" when it is).
    error: str = ""
    #: Triton pod IP -> the slot (server name) that holds it on this replica.
    slots: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.error


def frontdoor_replicas(pods: list[dict]) -> list[Replica]:
    """The front-door pods that are replicas: Running with an IP (a terminating one is marked)."""
    out = []
    for p in pods:
        meta, status = p.get("metadata") or {}, p.get("status") or {}
        if status.get("phase") == "Running" and status.get("podIP"):
            out.append(Replica(meta.get("name", ""), status["podIP"], bool(meta.get("deletionTimestamp"))))
    return sorted(out, key=lambda r: r.name)


def _table(text: str, marker: str) -> list[dict[str, str]]:
    """Rows of a runtime API table whose header line starts with ``marker`` (``# be_id`` or ``# pxname``)."""
    header: list[str] | None = None
    rows = []
    for ln in text.splitlines():
        if ln.startswith(marker):
            header = ln[2:].replace(",", " ").split() if marker == "# be_id" else ln[2:].split(",")
            continue
        if header and ln.strip() and not ln.startswith("#"):
            parts = ln.split() if marker == "# be_id" else ln.split(",")
            rows.append(dict(zip(header, parts, strict=False)))
    return rows


def pod_backends() -> list[str]:
    return [pool_backend(p) for p in PROTOS]


def commands_for(state_rows: list[dict[str, str]], stat_rows: list[dict[str, str]],
                 plan: Plan) -> tuple[list[str], dict[str, str]]:
    """What one replica needs to match ``plan`` (and, for the report, which slot holds which pod IP): from its
    ``show servers state`` rows (admin state, address, user weight) and ``show stat`` rows (``slim``)."""
    slim = {(r.get("pxname"), r.get("svname")): r.get("slim", "") for r in stat_rows}
    pools, fallbacks = set(pod_backends()), {fallback_backend(p) for p in PROTOS}
    cmds: list[str] = []
    slots: dict[str, str] = {}
    for r in state_rows:
        be, srv = r.get("be_name", ""), r.get("srv_name", "")
        if be in fallbacks:
            if slim.get((be, srv)) != str(plan.fallback_share()):
                cmds.append(f"set maxconn server {be}/{srv} {plan.fallback_share()}")
            continue
        if be not in pools:
            continue
        admin = int(r.get("srv_admin_state", "0") or 0)
        addr = r.get("srv_addr", "")
        held = addr if addr and addr not in ("-", "0.0.0.0") and not admin & ADMF_RMAINT else None
        want = plan.pods.get(held) if held else None
        if held and want is not None:
            slots.setdefault(held, srv)
        serving = want is None or want.serving
        weight = DEFAULT_WEIGHT if want is None or not want.serving else max(1, min(256, want.weight))
        drained = bool(admin & ADMF_FDRAIN)
        if serving and int(r.get("srv_uweight", DEFAULT_WEIGHT) or 0) != weight:
            cmds.append(f"set weight {be}/{srv} {weight}")
        if drained == serving:
            cmds.append(f"set server {be}/{srv} state {'ready' if serving else 'drain'}")
        if slim.get((be, srv)) != str(plan.share()):
            cmds.append(f"set maxconn server {be}/{srv} {plan.share()}")
    return cmds, slots


def program_replica(replica: Replica, plan: Plan, port: int = RUNTIME_PORT, timeout_s: float = 2.0) -> ReplicaResult:
    """Read one replica's servers, send what differs from ``plan``; any failure is the result's ``error``."""
    res = ReplicaResult(replica)
    try:
        state = _table(runtime_command(replica.ip, port, "show servers state", timeout_s, check=False), "# be_id")
        stat = _table(runtime_command(replica.ip, port, "show stat", timeout_s, check=False), "# pxname")
        if not any(r.get("be_name") in pod_backends() for r in state):
            raise HAProxyError(f"runtime API {replica.ip}:{port}: no {'/'.join(pod_backends())} servers in 'show "
                               "servers state' (not a recserve front door?)")
        cmds, res.slots = commands_for(state, stat, plan)
        for cmd in cmds:
            runtime_command(replica.ip, port, cmd, timeout_s)
            res.sent.append(cmd)
    except HAProxyError as exc:
        res.error = str(exc)[:500]
    return res


def program_all(replicas: list[Replica], plan: Plan, port: int = RUNTIME_PORT,
                timeout_s: float = 2.0) -> list[ReplicaResult]:
    """Every replica that is not terminating, in parallel (a replica that does not answer costs one timeout, not
    one per replica). A terminating replica is draining: it keeps what it had and is not reported."""
    live = [r for r in replicas if not r.terminating]
    if not live:
        return []
    with ThreadPoolExecutor(max_workers=min(8, len(live)), thread_name_prefix="frontdoor") as ex:
        return list(ex.map(lambda r: program_replica(r, plan, port, timeout_s), live))
