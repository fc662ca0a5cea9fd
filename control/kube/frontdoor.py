"""The front door on Kubernetes: the one-host HAProxy config generator (control/routing/haproxy.py, cluster mode)
rendered for a front-door Deployment, as the ConfigMap ``recserve-frontdoor`` it mounts.

Why a front door on the cluster: behind a ClusterIP Service, gRPC's long-lived HTTP/2 connections stay on the Triton
pods that existed when each client connected (kube-proxy balances connections, not requests), so a pod the HPA adds
gets no traffic from connected clients and a full pod has nobody to refuse for it. Each front-door replica is the
one-host front door (allow-list, size limits, admission with fast refusals, degraded answers, access log, refusal
backends, optional TLS) with a pool backend whose servers HAProxy resolves itself from the headless Service
``recserve-triton-ready``, which lists only pods whose golden readiness gate is open: a ``server-template`` (written
out, see ``control/routing/haproxy.py``) of as many slots as the Triton HPA's ``maxReplicas``, re-resolved every
check interval, so a new pod takes requests within one interval and a pod that leaves the answer gets no new ones.

Admission: a Triton pod takes ``initial_limit(knee, SLO)`` requests in flight (Little's law, the Router's rule on one
host, control/routing/admission.py); each front-door replica admits ``pod limit // replicas`` per pod (at least 1), so
the replicas together never put more than the pod limit on a pod while the HPA holds them at ``replicas`` (its
``minReplicas``). Above it (the front door's HPA scales on its own CPU) a pod may get up to ``limit x replicas_now /
replicas``, until the operator re-divides: it reads the pod limit from this ConfigMap (``recserve.io/pod-limit``) and
programs every replica through HAProxy's runtime API, opened on TCP port ``RUNTIME_PORT`` for the operator only
(control/kube/frontdoor_runtime.py): ``pod limit // the replicas running now`` on every pod slot, and per pod its
drain (gate closed) and canary weight.

The knee (requests/s one Triton pod serves within the SLO) is ``--knee-rps``; the committed render uses the Router's
conservative default (``DEFAULT_KNEE_RPS``, about half of what a quiet 2-core host measured), since no perf report of
a cluster pod exists here. In the cluster, the optional knee Job (deploy/k8s/components/knee-job,
control/kube/knee.py) measures one pod and writes the ConfigMap ``recserve-knee``; the operator then programs the
replicas with the pod limit from that knee instead of ``recserve.io/pod-limit``.

The serving spec (``--spec``; the committed render reads ``deploy/k8s/base/spec/spec.yaml``, the files Kustomize puts
in the ConfigMap ``recserve-spec`` that the operator mounts) sets what it sets on one host with ``recctl up --spec``:
the body limits (``spec_body_limits``: each model's largest request at its ``maxBatch``), the models whose shed
requests get the refusal at once (no ``degraded``), and the SLO the pod limit is computed from (the strictest
``sloP99Ms``). The allow-list of paths and methods is the one-host front door's (it names no model on one host
either). HAProxy cannot read a spec: the config is rendered from it, and carries the spec's digest
(``recserve.io/spec-sha256``, over the ConfigMap's files) which the operator compares with the spec it mounted
(a front door rendered from another spec makes the fleet Degraded, reason ``FrontDoorSpecStale``).

    python -m recserve.control.kube.frontdoor -o deploy/k8s/base/frontdoor-config.yaml
"""

from __future__ import annotations

import argparse
import hashlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import yaml

from recserve.control.defaults import FALLBACK_MAXCONN, FALLBACK_QUEUE, GRPC_PORT, HTTP_PORT, SLO_P99_MS
from recserve.control.kube.frontdoor_runtime import (
    FALLBACK_LIMIT_ANNOTATION,
    POD_LIMIT_ANNOTATION,
    RUNTIME_PORT,
    RUNTIME_PORT_ANNOTATION,
)
from recserve.control.kube.manifests import K8S_DIR, write_rendered
from recserve.control.routing.admission import initial_limit
from recserve.control.routing.frontdoor import REFUSE_LUA, FrontDoorConfig, SpecLimits, lua_path, spec_body_limits
from recserve.control.routing.haproxy import (
    PROTOS,
    ClusterMode,
    HAProxyConfig,
    errorfile_path,
    overloaded_reply,
    render_config,
)
from recserve.control.routing.router import DEFAULT_KNEE_RPS, RouterConfig
from recserve.control.runtime.triton import REPO_ROOT
from recserve.control.spec.spec import ServingSpec, load_spec

#: Where the ConfigMap is mounted in the front-door pod (the official haproxy image reads haproxy.cfg there).
CONFIG_DIR = PurePosixPath("/usr/local/etc/haproxy")
#: An emptyDir for the stats socket and the pid file (the root filesystem is read-only).
RUN_DIR = PurePosixPath("/var/run/haproxy")
#: The client TLS certificate of ``--tls``: a kubernetes.io/tls Secret mounted with tls.crt as ``client.pem`` and
#: tls.key as ``client.pem.key`` (HAProxy loads ``<crt>.key`` itself).
TLS_CRT = PurePosixPath("/etc/recserve/tls/client.pem")
CONFIGMAP = "recserve-frontdoor"
#: The ConfigMap's content hash, copied by Kustomize (replacements) onto the Deployment's pod template, so a changed
#: config rolls the front door (HAProxy does not reread a mounted file).
HASH_ANNOTATION = "recserve.io/config-sha256"
OUTPUT = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "base" / "frontdoor-config.yaml"
#: The Prometheus exporter and the kubelet's probes (/healthz).
METRICS_PORT = 8404
#: The serving spec on the cluster: these files become the ConfigMap ``recserve-spec`` (Kustomize's
#: configMapGenerator in deploy/k8s/base), mounted by the operator at ``SPEC_MOUNT``. ``repository`` in spec.yaml is
#: the checkout's model_repository (for this generator); the operator passes its own (``--repository /models``).
SPEC_DIR = K8S_DIR / "base" / "spec"
SPEC_CONFIGMAP = "recserve-spec"
SPEC_MOUNT = PurePosixPath("/etc/recserve/spec")
SPEC_FILE = "spec.yaml"
#: The digest of the spec files this config was rendered from (``spec_digest``); "" when rendered without a spec.
SPEC_ANNOTATION = "recserve.io/spec-sha256"
#: The model repository the committed render reads the spec's models from (configs only).
REPOSITORY = REPO_ROOT / "model_repository"


def data_digest(data: dict[str, str]) -> str:
    """sha256 over a ConfigMap's data (name and text of every key, sorted): the front door's config hash and the
    spec digest are both this."""
    return hashlib.sha256("".join(f"{k}\0{v}\0" for k, v in sorted(data.items())).encode()).hexdigest()


def spec_files(directory: Path) -> dict[str, str]:
    """The files of a spec directory as ConfigMap data: every regular file, by name. In a pod the ConfigMap's
    mount has Kubernetes' ``..data`` links and ``..<timestamp>`` directory besides the keys: those are skipped."""
    return {f.name: f.read_text() for f in sorted(Path(directory).iterdir())
            if not f.name.startswith(".") and f.is_file()}


def spec_digest(directory: Path) -> str:
    """The digest of a spec directory (``data_digest`` of ``spec_files``): the same in the checkout, in the rendered
    ConfigMap and in the pod that mounts it."""
    return data_digest(spec_files(directory))


@dataclass
class ClusterFrontDoor:
    """What the generator needs to know about the cluster; defaults are deploy/k8s/base's."""

    namespace: str = "recserve"
    cluster_domain: str = "cluster.local"
    #: Headless Service of the Triton pods whose readiness gate is open; headless Service of the degraded answers.
    pods_service: str = "recserve-triton-ready"
    fallback_service: str = "recserve-fallback"
    #: server-template slots: the Triton HPA's maxReplicas (a pod beyond them would get no requests).
    slots: int = 8
    #: Front-door replicas the per-pod limit is divided by: its HPA's minReplicas.
    replicas: int = 2
    #: Requests/s one Triton pod serves within the SLO; 0 = the Router's conservative default.
    knee_rps: float = 0.0
    slo_p99_ms: float = SLO_P99_MS
    fallback_slots: int = 2
    #: Terminate client TLS with the certificate at ``TLS_CRT`` (a mounted Secret).
    tls: bool = False
    #: Seconds a soft stop may take before HAProxy exits (hard-stop-after); the Deployment's grace period covers it.
    hard_stop_after_s: int = 30
    check_inter_ms: int = 1000
    #: The serving spec the rules come from (body limits, models without degraded answers, the SLO); None: the
    #: demo's contract limits and ``slo_p99_ms``.
    spec: ServingSpec | None = None
    #: ``spec_digest`` of the directory ``spec`` was read from (annotated; the operator compares it with its own).
    spec_sha256: str = ""
    #: HAProxy's runtime API on TCP (level admin) for the operator, which re-divides the limits and sets per-pod
    #: drain and weights (control/kube/frontdoor_runtime.py); the NetworkPolicy admits only the operator. 0: none.
    runtime_api_port: int = RUNTIME_PORT

    def fqdn(self, service: str) -> str:
        return f"{service}.{self.namespace}.svc.{self.cluster_domain}"

    def knee(self) -> tuple[float, str]:
        if self.knee_rps > 0:
            return self.knee_rps, "--knee-rps (a measured pod)"
        return DEFAULT_KNEE_RPS, "the Router's conservative default: no perf report of a cluster pod, measure one"

    def slo_ms(self) -> float:
        """The SLO one pod is held to: the strictest ``sloP99Ms`` of the spec's models (a pod serves them all), else
        ``slo_p99_ms``."""
        if self.spec is not None:
            return min(m.slo_p99_ms for m in self.spec.models.values())
        return self.slo_p99_ms

    def body_limits(self) -> SpecLimits | None:
        """The spec's body limits (``spec_body_limits``); None without a spec (the contract's limits apply)."""
        return spec_body_limits(self.spec) if self.spec is not None else None

    def no_degraded_models(self) -> tuple[str, ...]:
        """The spec's models without ``degraded``: their shed requests get the refusal at once."""
        if self.spec is None:
            return ()
        return tuple(sorted(n for n, m in self.spec.models.items() if m.degraded is None))

    def router(self) -> RouterConfig:
        """The one-host Router's settings for one pod: its SLO-derived timeouts and limit bounds apply unchanged."""
        return RouterConfig(workdir=Path(CONFIG_DIR), knee_rps=self.knee()[0], slo_p99_ms=self.slo_ms())

    def pod_limit(self) -> int:
        """In-flight requests one Triton pod takes within the SLO: knee x SLO (Little's law), the Router's bounds."""
        r = self.router()
        return initial_limit(self.knee()[0], self.slo_ms() / 1000, r.min_limit, r.max_limit)

    def replica_limit(self) -> int:
        """This replica's share of a pod's limit (``maxconn`` of each pod slot): the replicas never exceed it."""
        return max(1, self.pod_limit() // self.replicas)

    def haproxy_config(self, config_dir: Path | PurePosixPath = CONFIG_DIR, run_dir: Path | PurePosixPath = RUN_DIR,
                       nameservers: tuple[str, ...] = (), pods_fqdn: str | None = None,
                       fallback_fqdn: str | None = None, grpc_port: int = GRPC_PORT, http_port: int = HTTP_PORT,
                       pod_ports: tuple[int, int] = (GRPC_PORT, HTTP_PORT),
                       fallback_ports: tuple[int, int] = (GRPC_PORT, HTTP_PORT), bind: str = "0.0.0.0",
                       metrics_port: int = METRICS_PORT) -> HAProxyConfig:
        """The HAProxyConfig of one replica. The keyword arguments move it off the cluster (tests run it on loopback
        against a fake DNS server): the rules (limits, timeouts, admission, allow-list) stay the committed ones."""
        r = self.router()
        fd = FrontDoorConfig(bind=bind, allow_plaintext=True, tls_crt_path=str(TLS_CRT) if self.tls else None)
        limits = self.body_limits()
        if limits is not None:
            fd.max_grpc_body, fd.max_http_body = limits.grpc, limits.http
        cluster = ClusterMode(
            pods_fqdn=pods_fqdn or self.fqdn(self.pods_service), pod_grpc_port=pod_ports[0],
            pod_http_port=pod_ports[1],
            fallback_fqdn=fallback_fqdn if fallback_fqdn is not None else self.fqdn(self.fallback_service),
            fallback_slots=self.fallback_slots, fallback_grpc_port=fallback_ports[0],
            fallback_http_port=fallback_ports[1], nameservers=nameservers, run_dir=Path(run_dir),
            hard_stop_after_s=self.hard_stop_after_s)
        return HAProxyConfig(
            workdir=Path(config_dir), grpc_port=grpc_port, http_port=http_port, host=bind, slots=self.slots,
            check_inter_ms=self.check_inter_ms, check_rise=1, timeout_check_ms=self.check_inter_ms // 2,
            metrics_port=metrics_port, timeout_server_ms=r.timeout_server_ms(), maxconn=self.replica_limit(),
            fallback_maxconn=max(1, FALLBACK_MAXCONN // self.replicas),
            fallback_queue=max(0, FALLBACK_QUEUE // self.replicas),
            fallback_timeout_queue_ms=r.fallback_wait_ms(), frontdoor=fd, cluster=cluster,
            no_degraded_models=self.no_degraded_models())

    def config_text(self, config: HAProxyConfig) -> str:
        """haproxy.cfg: ``render_config`` plus the runtime API on TCP (``runtime_api_port``, on the frontends' bind
        address) beside the stats socket, for the operator."""
        text = render_config(config)
        if not self.runtime_api_port:
            return text
        line = f"  stats socket {config.socket_path} mode 600 level admin\n"
        assert line in text, "render_config's stats socket line moved"
        return text.replace(line, line + f"  stats socket ipv4@{config.host}:{self.runtime_api_port} level admin\n", 1)

    def fallback_limit(self) -> int:
        """In-flight limit of each degraded-answer server over all replicas (each replica's share is this divided)."""
        return FALLBACK_MAXCONN

    def files(self, config: HAProxyConfig | None = None) -> dict[str, str]:
        """Every file HAProxy reads, by name in the config directory: haproxy.cfg, the refusal service, the refusal
        errorfiles."""
        c = config or self.haproxy_config()
        out = {"haproxy.cfg": self.config_text(c), lua_path(c.workdir).name: REFUSE_LUA}
        for proto in PROTOS:
            out[errorfile_path(c, proto).name] = overloaded_reply(proto).decode()
        return out

    def describe(self) -> str:
        knee, source = self.knee()
        slo = f"SLO p99 {self.slo_ms():g} ms" + (" (the spec's strictest sloP99Ms)" if self.spec is not None else "")
        runtime = (f"; the operator re-divides it by the replicas running (runtime API port {self.runtime_api_port})"
                   if self.runtime_api_port else "; fixed (no runtime API)")
        return (f"knee {knee:g} rps per Triton pod ({source}) x {slo} = {self.pod_limit()} "
                f"in flight per pod; / {self.replicas} front-door replicas = {self.replica_limit()} per pod per "
                f"replica at start{runtime}; {self.slots} pod slots (the Triton HPA's maxReplicas)")

    def describe_spec(self) -> str:
        limits = self.body_limits()
        if limits is None:
            return "no serving spec: the demo contract's body limits, every shed request may get a degraded answer"
        none = ", ".join(self.no_degraded_models()) or "none"
        return (f"body limits from the serving spec: {limits.describe()}; models refused at once when shed (no "
                f"degraded): {none}")

    def configmap(self) -> dict:
        data = self.files()
        ann = {HASH_ANNOTATION: data_digest(data), "recserve.io/admission": self.describe(),
               "recserve.io/replicas": str(self.replicas), "recserve.io/slots": str(self.slots),
               SPEC_ANNOTATION: self.spec_sha256, "recserve.io/spec": self.describe_spec(),
               POD_LIMIT_ANNOTATION: str(self.pod_limit()), FALLBACK_LIMIT_ANNOTATION: str(self.fallback_limit()),
               RUNTIME_PORT_ANNOTATION: str(self.runtime_api_port)}
        return {"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": CONFIGMAP, "labels": {"app.kubernetes.io/name": "recserve-frontdoor",
                                                           "app.kubernetes.io/component": "frontdoor"},
                             "annotations": ann},
                "data": data}

    def render(self) -> str:
        head = ("# Generated by python -m recserve.control.kube.frontdoor (control/kube/frontdoor.py); do not edit:\n"
                "# regenerate, tests/test_kube_frontdoor.py checks that this file is current.\n"
                f"# Admission: {self.describe()}.\n# Serving spec: {self.describe_spec()}.\n")
        limits = self.body_limits()
        for w in limits.warnings if limits is not None else ():
            head += f"# Warning: {_relative(w)}\n"
        return head + yaml.dump(self.configmap(), Dumper=_Dumper, sort_keys=False, width=120)


def _relative(text: str) -> str:
    """Warnings name files by absolute path; the committed render names them from the checkout's root."""
    return text.replace(f"{REPO_ROOT}/", "")


def with_spec(directory: Path = SPEC_DIR, repository: Path = REPOSITORY, **kw) -> ClusterFrontDoor:
    """The generator with the serving spec of ``directory`` (``spec.yaml`` and the files it names), read against
    ``repository``: what the committed render is (``with_spec()``)."""
    spec = load_spec(Path(directory) / SPEC_FILE, repository)
    return ClusterFrontDoor(spec=spec, spec_sha256=spec_digest(directory), **kw)


class _Dumper(yaml.SafeDumper):
    """Multi-line text as YAML literal blocks (the config stays readable in the manifest); other text as usual."""


def _str(dumper: yaml.SafeDumper, s: str) -> yaml.Node:
    if "\n" in s and "\r" not in s:
        return dumper.represent_scalar("tag:yaml.org,2002:str", s, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", s)


_Dumper.add_representer(str, _str)


def main(argv: list[str] | None = None) -> None:
    d = ClusterFrontDoor()
    p = argparse.ArgumentParser(prog="python -m recserve.control.kube.frontdoor", description=__doc__.splitlines()[0])
    p.add_argument("-o", "--output", type=Path, help=f"write the ConfigMap here (default: stdout; committed: {OUTPUT})")
    p.add_argument("--knee-rps", type=float, default=d.knee_rps,
                   help="requests/s one Triton pod serves within the SLO (default: the Router's conservative default)")
    p.add_argument("--slo-p99-ms", type=float, default=d.slo_p99_ms)
    p.add_argument("--replicas", type=int, default=d.replicas,
                   help="front-door replicas the pod limit is divided by (its HPA's minReplicas)")
    p.add_argument("--slots", type=int, default=d.slots, help="pod slots (the Triton HPA's maxReplicas)")
    p.add_argument("--namespace", default=d.namespace)
    p.add_argument("--cluster-domain", default=d.cluster_domain)
    p.add_argument("--runtime-api-port", type=int, default=d.runtime_api_port,
                   help="HAProxy's runtime API on TCP for the operator (0: none; the limits then stay as rendered)")
    p.add_argument("--tls", action="store_true", help=f"terminate client TLS with {TLS_CRT} (a mounted Secret)")
    p.add_argument("--spec-dir", type=Path, default=SPEC_DIR,
                   help=f"the serving spec's directory ({SPEC_FILE} and its golden files: the ConfigMap "
                        f"{SPEC_CONFIGMAP}); default: {SPEC_DIR}")
    p.add_argument("--repository", type=Path, default=REPOSITORY,
                   help="the model repository the spec's models are read from (their config.pbtxt)")
    p.add_argument("--no-spec", action="store_true",
                   help="render without a serving spec: the demo contract's limits and --slo-p99-ms")
    a = p.parse_args(argv)
    if a.replicas < 1:
        p.error("--replicas must be >= 1")
    kw = dict(namespace=a.namespace, cluster_domain=a.cluster_domain, slots=a.slots, replicas=a.replicas,
              knee_rps=a.knee_rps, slo_p99_ms=a.slo_p99_ms, tls=a.tls, runtime_api_port=a.runtime_api_port)
    gen = ClusterFrontDoor(**kw) if a.no_spec else with_spec(a.spec_dir, a.repository, **kw)
    write_rendered(gen.render(), a.output)


if __name__ == "__main__":
    main()
