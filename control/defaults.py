"""Every default of the control plane's settings, once: the flags (control/settings.py), FleetConfig, RouterConfig
and HAProxyConfig all take their defaults from here, so a default changes in one place.

Imports nothing of recserve: any module may import it.
"""

from __future__ import annotations

from pathlib import Path

#: The repository's root (in a wheel: the recserve package folder, which holds the same layout).
REPO_ROOT = Path(__file__).resolve().parents[1]
#: Runtime directory of a fleet (state, token, logs) when neither --root nor $RECSERVE_ROOT says.
DEFAULT_ROOT = REPO_ROOT / ".recserve"
#: The demo's model repository.
DEFAULT_REPOSITORY = REPO_ROOT / "model_repository"

# ---------------------------------------------------------------------------------------------- ports
#: Clients' gRPC and HTTP ports (HAProxy's; a standalone Triton's too: Triton's own defaults).
GRPC_PORT = 8001
HTTP_PORT = 8000
#: The control API (gRPC) and the control plane's Prometheus metrics.
CONTROL_PORT = 50051
CONTROL_METRICS_PORT = 9108
#: HAProxy's Prometheus exporter: 0 = a free port, remembered in <root>/monitoring/haproxy.port.
HAPROXY_METRICS_PORT = 0
#: Loopback: the control API and the client ports leave this host only when asked (and then with TLS).
LOOPBACK = "127.0.0.1"

# ---------------------------------------------------------------------------------------------- fleet
INSTANCES = 2
SLOTS = 4
MODES = ("active-active", "primary-standby")
MODE = "active-active"
#: Actives in active-active mode at first start.
ACTIVE = 2
HEALTH_INTERVAL_S = 0.3

# ---------------------------------------------------------------------------------------------- routing
#: p99 target of admitted requests (ms): sets the in-flight limits and HAProxy's ``timeout server``.
SLO_P99_MS = 50.0
#: The host's knee in requests/s; 0 = the latest perf report, else the built-in default.
KNEE_RPS = 0.0
#: HAProxy ``timeout server`` override in ms; 0 = derived from the SLO (control/routing/router.py).
TIMEOUT_SERVER_MS = 0
#: Defaults of the degraded-answer backend: 32 in flight (the fallback server's own concurrency is twice that), 64
#: more waiting; measured in proxy-crash at 0.7x the knee: no queue 91 refused in the reconnect burst, 32 places
#: and 25 ms 42, 64 places and 100 ms none.
FALLBACK_MAXCONN = 32
FALLBACK_QUEUE = 64
#: How the host's in-flight limit follows from the knee (control/routing/admission.py ``limit_latency_s``):
#: ``p99`` = knee x the SLO p99 (the limit since issue 9); ``mean`` = knee x the MEAN latency at the knee (Little's
#: law relates requests in flight to throughput x mean latency), where no mean was measured knee x SLO /
#: ``P99_TO_MEAN``. docs/peak-traffic.md "In-flight limits" has the measurement that chose the default.
#: ``sqrt`` = the mean rule's concurrency L = knee x mean plus ``SQRT_BETA`` x sqrt(L) (square-root staffing: room
#: for the fluctuation of a Poisson-like arrival count around its mean, which a cap at L alone turns away).
LIMIT_RULES = ("p99", "mean", "sqrt")
LIMIT_RULE = "p99"
#: The ``sqrt`` rule's safety factor (Halfin-Whitt's beta): 2 keeps the servers busy through ~2 standard deviations
#: of the in-flight count.
SQRT_BETA = 2.0
#: The p99-to-mean ratio the ``mean`` rule assumes where the knee's mean latency is unknown: at the drills' knee on
#: a 2-core host the mean was ~20 ms for a p99 of ~50 ms (issue 22).
P99_TO_MEAN = 2.5
#: The knee's mean latency in ms (``--knee-mean-ms``); 0 = unknown (from the perf report when it has one).
KNEE_MEAN_MS = 0.0

# ---------------------------------------------------------------------------------------------- warm-up
#: Warm-up of an instance after it loads a version and passes its golden check, before it takes traffic
#: (control/fleet/warmup.py, docs/holds.md): at most this many rounds of the golden / probe requests at every batch
#: size the batcher forms (0: no warm-up) ...
WARMUP_ROUNDS = 8
#: ... until each composing model's compute_infer per execution is within this factor of an instance that serves
#: now (same model, same batch size) ...
WARMUP_RATIO = 1.5
#: ... or this many seconds passed (the instance is then admitted, reported not warm with the figures).
WARMUP_DEADLINE_S = 20.0
