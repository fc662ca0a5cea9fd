"""The control plane's settings, one object: what ``recctl up`` and ``python -m recserve.control.server`` take.

``Settings`` nests one dataclass per concern (ports, fleet, routing, front door, control API, backups); each field
carries its command-line flag (name, help, type) in its metadata and its default from control/defaults.py.
``add_flags`` adds them to a parser (recctl up's with its parse-time validation types, the server's with plain
ones), ``from_args`` reads them back, and ``FleetConfig`` is built from them here (``fleet_config``), so a setting
is declared once and reaches the fleet without being copied field by field in between.

``recctl up`` writes the settings to ``<root>/settings.json`` (mode 0600: it may name secret key files) and starts
the server with ``--settings FILE``; the server takes the file's values as the defaults of its flags, so flags
given beside it still win.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recserve.control import defaults as d
from recserve.control.argtypes import (
    existing_dir,
    existing_file,
    float_range,
    int_range,
    nonempty,
    port,
)
from recserve.control.routing.frontdoor import DOOR_BATCH_GRPC, DOOR_BATCH_HTTP, GRPC_MAX_BODY, HTTP_MAX_BODY

#: The file ``recctl up`` writes and the server reads (``--settings``).
SETTINGS_FILE = "settings.json"
#: Flags of the settings that recctl takes once for every command (before the command's name), not from ``up``.
RECCTL_GLOBAL = ("--root",)


def flag(default: Any, name: str, help: str | None = None, *, type: Any = None, cli_type: Any = None,
         env: str | None = None, cli_default: Any = dataclasses.MISSING, choices: tuple | None = None,
         switch: bool = False, invert: bool = False, aliases: tuple[str, ...] = ()) -> Any:
    """A settings field with its flag: ``name`` (and ``aliases``, the names a renamed flag keeps), ``help``,
    ``type`` (the server's parser) and ``cli_type`` (recctl's parse-time validation, default ``type``), ``env``
    (recctl's default comes from this variable when it is set), ``cli_default`` (recctl's default, where it
    differs: decided later, e.g. the spec's repository), ``switch`` (a store_true flag; ``invert``: the flag
    turns the field off, ``--no-fallback``)."""
    meta = {"flag": name, "help": help, "type": type, "cli_type": cli_type or type, "env": env,
            "cli_default": cli_default, "choices": choices, "switch": switch, "invert": invert, "aliases": aliases}
    return field(default=default, metadata=meta)


def _path_or_none(text: str | None) -> Path | None:
    return Path(text) if text else None


@dataclass
class Ports:
    grpc: int = flag(d.GRPC_PORT, "--grpc-port", "HAProxy gRPC port for clients", type=int, cli_type=port,
                     env="PORT_GRPC")
    http: int = flag(d.HTTP_PORT, "--http-port", "HAProxy HTTP port for clients", type=int, cli_type=port,
                     env="PORT_HTTP")
    control: int = flag(d.CONTROL_PORT, "--control-port", type=int, cli_type=port, env="PORT_CONTROL")
    metrics: int = flag(d.CONTROL_METRICS_PORT, "--metrics-port", type=int, cli_type=port, env="PORT_CONTROL_METRICS")
    haproxy_metrics: int = flag(d.HAPROXY_METRICS_PORT, "--haproxy-metrics-port", "HAProxy's Prometheus exporter "
                                "(0: a free port, remembered in <root>/monitoring/haproxy.port)", type=int,
                                cli_type=int_range(1, 65535, zero_ok=True))


@dataclass
class FleetSettings:
    instances: int = flag(d.INSTANCES, "--instances", type=int, cli_type=int_range(1))
    mode: str = flag(d.MODE, "--mode", "active-active: --active instances share traffic (leastconn), the rest are "
                     "hot standbys; primary-standby: one primary, standbys take over", choices=d.MODES)
    active: int = flag(d.ACTIVE, "--active", "actives in active-active mode at first start (later: recctl scale)",
                       type=int, cli_type=int_range(1))
    health_interval_s: float = flag(d.HEALTH_INTERVAL_S, "--health-interval", "seconds between the health checks "
                                    "of each instance", type=float, cli_type=float_range(0.05, 60, "seconds"))
    warmup_rounds: int = flag(d.WARMUP_ROUNDS, "--warmup-rounds", "warm-up of an instance that loaded a version, "
                              "before it takes traffic: at most this many rounds of the golden requests at every batch "
                              "size the batcher forms (0: none; docs/holds.md)", type=int,
                              cli_type=int_range(0, 1000))
    warmup_ratio: float = flag(d.WARMUP_RATIO, "--warmup-ratio", "warm: each composing model's compute_infer per "
                               "execution (Triton's statistics) within this factor of a serving instance's",
                               type=float, cli_type=float_range(1, 100, "x"))
    warmup_deadline_s: float = flag(d.WARMUP_DEADLINE_S, "--warmup-deadline", "seconds a warm-up may take; then the "
                                    "instance is admitted, reported not warm", type=float,
                                    cli_type=float_range(0.1, 600, "seconds"))


@dataclass
class RoutingSettings:
    knee_rps: float = flag(d.KNEE_RPS, "--knee-rps", "the host's knee (rps with p99 under the SLO); per-server "
                           "limits = knee x SLO / actives (0: reports/perf/latest, else 500)", type=float,
                           cli_type=float_range(0, 1_000_000, "requests/s"))
    slo_p99_ms: float = flag(d.SLO_P99_MS, "--slo-p99-ms", "p99 target of admitted requests", type=float,
                             cli_type=float_range(1, 10000, "ms"))
    limit_rule: str = flag(d.LIMIT_RULE, "--limit-rule", "how the host's in-flight limit follows from the knee: p99 "
                           "= knee x SLO p99; mean = knee x the mean latency at the knee (--knee-mean-ms, else the "
                           f"perf report's, else SLO / {d.P99_TO_MEAN:g}); sqrt = that mean concurrency L plus "
                           f"{d.SQRT_BETA:g} x sqrt(L)", type=str, choices=d.LIMIT_RULES)
    knee_mean_ms: float = flag(d.KNEE_MEAN_MS, "--knee-mean-ms", "mean latency at the knee in ms, for --limit-rule "
                               "mean or sqrt (0: unknown)", type=float, cli_type=float_range(0, 10000, "ms"))
    fallback: bool = flag(True, "--no-fallback", "no degraded answers: shed = 429/RESOURCE_EXHAUSTED", switch=True,
                          invert=True)
    fallback_maxconn: int = flag(d.FALLBACK_MAXCONN, "--fallback-maxconn", "in-flight limit of the degraded-answer "
                                 "server; beyond it shed requests get 429/RESOURCE_EXHAUSTED", type=int,
                                 cli_type=int_range(1))
    fallback_queue: int = flag(d.FALLBACK_QUEUE, "--fallback-queue", "shed requests that may wait (2 x SLO at most) "
                               "for a degraded answer in a burst; 0: refuse at once", type=int,
                               cli_type=int_range(0, 10000))
    timeout_server_ms: int = flag(d.TIMEOUT_SERVER_MS, "--timeout-server-ms", "HAProxy timeout server (0: 4 x SLO "
                                  "within 100..1000 ms); raise it where the latency tail is far fatter than the SLO",
                                  type=int, cli_type=int_range(50, 60000, "ms", zero_ok=True))
    adaptive_limits: bool = flag(False, "--adaptive-limits", "AIMD controller moves the limits", switch=True)


@dataclass
class FrontDoorSettings:
    bind: str = flag(d.LOOPBACK, "--client-bind", "address of the client ports (default 127.0.0.1; others need "
                     "--client-tls-cert/--client-tls-key or --client-allow-plaintext)", type=str,
                     cli_type=nonempty("an address"))
    tls_cert: Path | None = flag(None, "--client-tls-cert", "PEM certificate: HAProxy's client ports speak TLS",
                                 type=Path, cli_type=existing_file)
    tls_key: Path | None = flag(None, "--client-tls-key", "PEM private key of --client-tls-cert (mode 0600)",
                                type=Path, cli_type=existing_file)
    allow_plaintext: bool = flag(False, "--client-allow-plaintext", "allow a non-loopback --client-bind without TLS "
                                 "(a private network you trust)", switch=True)
    #: None: with a spec, its models' largest request; else the demo's contract (control/api/server.py front_door).
    max_grpc_body: int | None = flag(None, "--max-grpc-body", "largest gRPC request body in bytes (default: with "
                                     "--spec, its models' largest request at their maxBatch; else batch "
                                     f"{DOOR_BATCH_GRPC} of 1000-item histories, {GRPC_MAX_BODY:,}; larger limits "
                                     "cost HAProxy CPU)", type=int, cli_type=int_range(0))
    max_http_body: int | None = flag(None, "--max-http-body", "largest HTTP request body in bytes (default: with "
                                     "--spec, its models' largest request as JSON at their maxBatch; else batch "
                                     f"{DOOR_BATCH_HTTP} of 1000-item histories as JSON, {HTTP_MAX_BODY:,})",
                                     type=int, cli_type=int_range(0))


@dataclass
class ControlApiSettings:
    host: str = flag(d.LOOPBACK, "--control-host", "control API bind address; anything but loopback needs "
                     "--tls-cert/--tls-key", type=str, cli_type=nonempty("an address"))
    tls_cert: Path | None = flag(None, "--tls-cert", "PEM server certificate: the control API speaks TLS", type=Path,
                                 cli_type=existing_file)
    tls_key: Path | None = flag(None, "--tls-key", "PEM private key of --tls-cert (mode 0600)", type=Path,
                                cli_type=existing_file)
    tls_ca: Path | None = flag(None, "--tls-ca", "CA clients trust (default: --tls-cert itself, for a self-signed "
                               "one); written to endpoints.json for recctl", type=Path, cli_type=existing_file)


@dataclass
class BackupSettings:
    root: Path | None = flag(None, "--backup-root", "snapshots of the model repository (default <root>/backups)",
                             type=Path)
    policy: Path | None = flag(None, "--backup-policy", "backup policy file (docs/operations.md 'Backup and "
                               "recovery'; default $RECSERVE_BACKUP_POLICY); none: no scheduled backups", type=Path,
                               cli_type=existing_file, env="RECSERVE_BACKUP_POLICY")


@dataclass
class Settings:
    root: Path = flag(d.DEFAULT_ROOT, "--root", "runtime directory of the fleet (state, token, logs)", type=Path,
                      env="RECSERVE_ROOT")
    repository: Path | None = flag(d.DEFAULT_REPOSITORY, "--repository", "model repository to serve (default: the "
                                   "--spec's repository, else model_repository/)", type=Path, cli_type=existing_dir,
                                   cli_default=None)
    spec: Path | None = flag(None, "--spec", "serving spec (recctl init writes one): the models it names are served "
                             "and golden-checked by its rules (default: the demo's recommend/search)", type=Path,
                             cli_type=existing_file, env="SPEC")
    ports: Ports = field(default_factory=Ports)
    fleet: FleetSettings = field(default_factory=FleetSettings)
    routing: RoutingSettings = field(default_factory=RoutingSettings)
    frontdoor: FrontDoorSettings = field(default_factory=FrontDoorSettings)
    control: ControlApiSettings = field(default_factory=ControlApiSettings)
    backup: BackupSettings = field(default_factory=BackupSettings)

    # ------------------------------------------------------------------------------------------ the file
    def to_dict(self) -> dict:
        """JSON-ready: paths as strings, one object per section."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, doc: dict) -> Settings:
        """The inverse of ``to_dict``; a key it does not know is refused (a typo must not pass as a default)."""
        return _build(cls, doc, "")

    def write(self, path: Path) -> Path:
        """Written whole (a temporary file renamed over it), mode 0600: it may name the TLS key files."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def read(cls, path: Path) -> Settings:
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise SettingsError(f"settings file {path}: {exc}") from None
        if not isinstance(doc, dict):
            raise SettingsError(f"settings file {path}: not a JSON object")
        return cls.from_dict(doc)


class SettingsError(ValueError):
    """A settings file that cannot be read, or names a setting that does not exist."""


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return str(v) if isinstance(v, Path) else v


def _build(cls: type, doc: dict, where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(doc) - set(fields))
    if unknown:
        raise SettingsError(f"unknown setting(s) {', '.join(where + k for k in unknown)}")
    kw: dict[str, Any] = {}
    for name, value in doc.items():
        f = fields[name]
        if "flag" not in f.metadata:  # a section
            if not isinstance(value, dict):
                raise SettingsError(f"setting {where}{name} must be an object")
            kw[name] = _build(f.default_factory, value, f"{where}{name}.")  # type: ignore[arg-type]
        elif f.metadata["type"] is Path:
            kw[name] = _path_or_none(value)
        else:
            kw[name] = value
    return cls(**kw)


# ---------------------------------------------------------------------------------------------- the flags
@dataclass(frozen=True)
class Flag:
    """One leaf of ``Settings``: where it lives (``path``: section and field names) and its field."""

    path: tuple[str, ...]
    field: dataclasses.Field

    @property
    def name(self) -> str:
        return self.field.metadata["flag"]

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")


def flags(cls: type = Settings, path: tuple[str, ...] = ()) -> list[Flag]:
    """Every setting with its flag, in declaration order (sections depth first)."""
    out: list[Flag] = []
    for f in dataclasses.fields(cls):
        if "flag" in f.metadata:
            out.append(Flag((*path, f.name), f))
        else:
            out += flags(f.default_factory, (*path, f.name))  # type: ignore[arg-type]
    return out


def add_flags(parser: argparse.ArgumentParser, *, cli: bool = False, skip: tuple[str, ...] = ()) -> None:
    """Add every setting's flag to ``parser``. ``cli``: recctl's flavour (parse-time validation types, defaults
    from the environment variables named, ``cli_default``); else the server's (plain types and the defaults of
    ``Settings``). ``skip``: flags the parser already has (recctl's global ``--root``)."""
    for fl in flags():
        if fl.name in skip:
            continue
        m = fl.field.metadata
        default = fl.field.default
        if cli:
            if m["cli_default"] is not dataclasses.MISSING:
                default = m["cli_default"]
            if m["env"] and os.environ.get(m["env"]):  # as recctl always did: a port as an int, the rest as text
                default = int(os.environ[m["env"]]) if m["cli_type"] is port else os.environ[m["env"]]
        elif fl.name == "--root":
            default = Path(os.environ.get("RECSERVE_ROOT", default))
        kw: dict[str, Any] = {"help": m["help"], "dest": fl.dest}
        if m["switch"]:
            kw["action"] = "store_true"
        else:
            kw["default"] = default
            kw["type"] = m["cli_type"] if cli else m["type"]
            if m["choices"]:
                kw["choices"] = m["choices"]
        parser.add_argument(fl.name, *m["aliases"], **kw)


def from_args(ns: argparse.Namespace, **override: Any) -> Settings:
    """The ``Settings`` a parsed command line says (flags ``ns`` lacks keep their defaults); ``override``:
    top-level fields set by the caller (recctl: ``root``, ``repository``)."""
    sections: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for fl in flags():
        if not hasattr(ns, fl.dest):
            continue
        v = getattr(ns, fl.dest)
        m = fl.field.metadata
        if m["invert"]:
            v = not v
        elif m["type"] is Path:
            v = Path(v) if v not in (None, "") else None
        if fl.name in ("--max-grpc-body", "--max-http-body") and not v:
            v = None  # recctl's 0: the default
        if len(fl.path) == 1:
            top[fl.path[0]] = v
        else:
            sections.setdefault(fl.path[0], {})[fl.path[1]] = v
    top |= override
    kw = {name: type(getattr(Settings(), name))(**values) for name, values in sections.items()}
    return Settings(**top, **kw)


def to_args(s: Settings) -> dict[str, Any]:
    """dest -> value of every flag: a parser's defaults (``parser.set_defaults(**to_args(s))``)."""
    out: dict[str, Any] = {}
    for fl in flags():
        v: Any = s
        for part in fl.path:
            v = getattr(v, part)
        out[fl.dest] = (not v) if fl.field.metadata["invert"] else v
    return out


# ---------------------------------------------------------------------------------------------- the fleet
def fleet_config(s: Settings, frontdoor: Any, *, fallback: bool | None = None,
                 haproxy_metrics_port: int | None = None) -> Any:
    """The ``FleetConfig`` these settings make (RouterConfig and HAProxyConfig follow from it: the Fleet builds
    its RouterConfig from its FleetConfig, and RouterConfig.haproxy_config the HAProxyConfig). ``frontdoor``:
    the validated FrontDoorConfig; ``fallback``/``haproxy_metrics_port``: what the server decided beyond the
    settings (no degraded answers for a spec's models; the remembered exporter port)."""
    from recserve.control.fleet.config import FleetConfig

    f, r = s.fleet, s.routing
    return FleetConfig(root=s.root, repository=s.repository or d.DEFAULT_REPOSITORY, spec=s.spec,
                       grpc_port=s.ports.grpc, http_port=s.ports.http, instances=f.instances,
                       health_interval_s=f.health_interval_s, mode=f.mode, active=min(f.active, f.instances),
                       warmup_rounds=f.warmup_rounds, warmup_ratio=f.warmup_ratio,
                       warmup_deadline_s=f.warmup_deadline_s,
                       knee_rps=r.knee_rps, slo_p99_ms=r.slo_p99_ms,
                       fallback=r.fallback if fallback is None else fallback, adaptive_limits=r.adaptive_limits,
                       fallback_maxconn=r.fallback_maxconn, fallback_queue=r.fallback_queue,
                       timeout_server_ms=r.timeout_server_ms,
                       haproxy_metrics_port=s.ports.haproxy_metrics if haproxy_metrics_port is None
                       else haproxy_metrics_port, frontdoor=frontdoor)
