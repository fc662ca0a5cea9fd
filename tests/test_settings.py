"""Issue 20 item 4: one settings object (control/settings.py) with one default per setting (control/defaults.py).

Every flag of the control-plane server is settable from ``recctl up`` and the other way round (both parsers are
walked); ``recctl up`` hands the server a settings file, which round-trips; and the defaults that mean the SLO, the
ports and the repository root are written once. No fleet is started here.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from recserve.control import defaults
from recserve.control.api import recctl, server
from recserve.control.fleet.config import FleetConfig
from recserve.control.routing.frontdoor import FrontDoorConfig
from recserve.control.routing.haproxy import HAProxyConfig
from recserve.control.routing.router import RouterConfig
from recserve.control.settings import (
    RECCTL_GLOBAL,
    SETTINGS_FILE,
    Settings,
    SettingsError,
    flags,
    fleet_config,
    from_args,
)

ROOT = Path(__file__).resolve().parent.parent
#: recctl up's own flags, not settings of the server: output format and --dry-run (every changing command has them).
RECCTL_ONLY = {"-h", "--help", "-o", "--output", "--json", "--dry-run"}
#: The server's own flag: where recctl up hands it the settings.
SERVER_ONLY = {"-h", "--help", "--settings"}
ENV = ("RECSERVE_ROOT", "PORT_GRPC", "PORT_HTTP", "PORT_CONTROL", "PORT_CONTROL_METRICS", "SPEC",
       "RECSERVE_BACKUP_POLICY")


@pytest.fixture(autouse=True)
def _no_env_defaults(monkeypatch):
    for var in ENV:
        monkeypatch.delenv(var, raising=False)


def _options(p: argparse.ArgumentParser) -> set[str]:
    return {o for a in p._actions for o in a.option_strings}  # noqa: SLF001


def _up_parser() -> argparse.ArgumentParser:
    top = recctl.build_parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    return sub.choices["up"]


def test_every_server_flag_is_settable_from_recctl_up_and_back():
    srv, up = _options(server.build_parser()), _options(_up_parser())
    top = _options(recctl.build_parser())
    assert set(RECCTL_GLOBAL) <= top  # --root: recctl's global flag, the runtime root of every command
    only_server = srv - SERVER_ONLY - up - set(RECCTL_GLOBAL)
    only_up = up - RECCTL_ONLY - srv
    assert not only_server, f"server flags recctl up cannot set: {sorted(only_server)} (declare them in settings.py)"
    assert not only_up, f"recctl up flags the server does not take: {sorted(only_up)}"
    assert {fl.name for fl in flags()} <= srv


def test_the_walk_fails_on_a_flag_only_one_parser_has(monkeypatch):
    """The walk above is not vacuous: a flag added to the server's parser only is reported."""
    real = server.build_parser

    def with_extra():
        p = real()
        p.add_argument("--only-here", type=int, default=1)
        return p

    monkeypatch.setattr(server, "build_parser", with_extra)
    with pytest.raises(AssertionError, match="--only-here"):
        test_every_server_flag_is_settable_from_recctl_up_and_back()


def test_flags_keep_their_names_and_recctl_keeps_its_validation():
    up = {a.option_strings[0]: a for a in _up_parser()._actions if a.option_strings}  # noqa: SLF001
    for name in ("--grpc-port", "--http-port", "--control-port", "--metrics-port", "--instances", "--mode",
                 "--active", "--knee-rps", "--slo-p99-ms", "--no-fallback", "--fallback-maxconn",
                 "--fallback-queue", "--timeout-server-ms", "--adaptive-limits", "--tls-cert", "--tls-key",
                 "--tls-ca", "--client-bind", "--client-tls-cert", "--client-tls-key", "--client-allow-plaintext",
                 "--max-grpc-body", "--max-http-body", "--spec", "--backup-policy", "--repository",
                 "--health-interval", "--haproxy-metrics-port", "--backup-root", "--control-host"):
        assert name in up, name
    assert up["--grpc-port"].type.__name__ == "port"
    assert up["--tls-cert"].type is recctl.existing_file and up["--repository"].type.__name__ == "existing_dir"
    with pytest.raises(SystemExit):
        _up_parser().parse_args(["--health-interval", "0"])


def test_defaults_are_one_and_the_same_everywhere():
    """The server's flags, recctl up's flags, Settings, FleetConfig, RouterConfig and HAProxyConfig agree."""
    assert from_args(server.parse_args([])) == Settings()
    up = _up_parser().parse_args([])
    assert from_args(up, repository=defaults.DEFAULT_REPOSITORY) == Settings()
    assert up.repository is None  # recctl up: the --spec's repository, else the demo's (decided in cmd_up)
    fc = fleet_config(Settings(), FrontDoorConfig())
    assert fc == FleetConfig(frontdoor=FrontDoorConfig())
    rc, hc = RouterConfig(workdir=Path("w")), HAProxyConfig(workdir=Path("w"))
    assert (fc.slo_p99_ms, rc.slo_p99_ms) == (defaults.SLO_P99_MS,) * 2
    assert (fc.grpc_port, rc.grpc_port, hc.grpc_port) == (defaults.GRPC_PORT,) * 3
    assert (fc.http_port, rc.http_port, hc.http_port) == (defaults.HTTP_PORT,) * 3
    assert (fc.fallback_maxconn, rc.fallback_maxconn, hc.fallback_maxconn) == (defaults.FALLBACK_MAXCONN,) * 3
    from recserve.control.spec.spec import DEFAULT_SLO_P99_MS  # the spec's own copy (see ALLOWED below)

    assert DEFAULT_SLO_P99_MS == defaults.SLO_P99_MS


def _custom(tmp_path: Path) -> Settings:
    s = Settings(root=tmp_path / "root", repository=tmp_path / "repo", spec=tmp_path / "spec.yaml")
    s.ports.grpc, s.ports.haproxy_metrics = 18001, 19999
    s.fleet.instances, s.fleet.mode, s.fleet.health_interval_s = 3, "primary-standby", 0.7
    s.routing.slo_p99_ms, s.routing.fallback, s.routing.adaptive_limits = 80.0, False, True
    s.frontdoor.tls_key, s.frontdoor.max_grpc_body = tmp_path / "client.key", 123456
    s.control.host, s.control.tls_key = "10.0.0.1", tmp_path / "control.key"
    s.backup.root = tmp_path / "backups"
    return s


def test_the_settings_file_round_trips(tmp_path):
    s = _custom(tmp_path)
    path = s.write(tmp_path / SETTINGS_FILE)
    assert path.stat().st_mode & 0o777 == 0o600  # it names key files
    assert Settings.read(path) == s
    assert from_args(server.parse_args(["--settings", str(path)])) == s  # what the server runs with
    ns = server.parse_args(["--settings", str(path), "--grpc-port", "18555"])  # a flag beside it wins
    assert ns.grpc_port == 18555 and ns.instances == 3 and ns.no_fallback is True
    doc = json.loads(path.read_text())
    doc["routing"]["slo_p99"] = 10  # a typo is refused, never taken as a default
    path.write_text(json.dumps(doc))
    with pytest.raises(SettingsError, match="routing.slo_p99"):
        Settings.read(path)


def test_recctl_up_writes_the_settings_and_starts_the_server_with_them(tmp_path, monkeypatch, capsys):
    repo = tmp_path / "repo"
    repo.mkdir()
    key = tmp_path / "client.key"
    key.write_text("k")
    key.chmod(0o600)
    root = tmp_path / "root"
    argv = ["--root", str(root), "up", "--repository", str(repo), "--grpc-port", "18001", "--health-interval", "1.5",
            "--haproxy-metrics-port", "19100", "--backup-root", str(tmp_path / "b"), "--control-host", "127.0.0.2",
            "--client-tls-key", str(key), "--no-fallback", "-o", "json"]
    assert recctl.main([*argv, "--dry-run"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert not root.exists()  # a dry run writes nothing
    assert planned["command"][-2:] == ["--settings", str(root / SETTINGS_FILE)]
    started: list[list[str]] = []

    class Exited:
        pid, returncode = 4321, 1

        def __init__(self, cmd, **kw):
            started.append(cmd)

        def poll(self):
            return 1

    monkeypatch.setattr(recctl.subprocess, "Popen", Exited)
    assert recctl.main(argv) == 1  # the fake server "exited": recctl says so
    assert started == [planned["command"]]
    path = root / SETTINGS_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    s = Settings.read(path)
    assert s.to_dict() == planned["settings"]
    assert (s.root, s.repository, s.ports.grpc, s.fleet.health_interval_s) == (root, repo, 18001, 1.5)
    assert (s.ports.haproxy_metrics, s.backup.root, s.control.host) == (19100, tmp_path / "b", "127.0.0.2")
    assert (s.frontdoor.tls_key, s.routing.fallback) == (key, False)
    assert from_args(server.parse_args(started[0][3:])) == s  # the server parses exactly these


# ---------------------------------------------------------------------------------------------- one default
#: Literals of the defaults that may stay outside control/defaults.py, and why.
ALLOWED = {
    ("control/rollout/manager.py", "50.0"): "a rollout gate's noise floor (min_p99_ms), not the SLO",
    ("control/kube/operator.py", "9108"): "the Kubernetes operator's own metrics port, another process",
}
LITERALS = re.compile(r"(?<![\w.])(50\.0|8001|8000|50051|9108)(?![\w.])|REPO_ROOT\s*=")


def test_one_default_per_setting():
    found = set()
    for path in sorted((ROOT / "control").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel == "control/defaults.py" or "/proto/" in rel:
            continue
        for m in LITERALS.finditer(path.read_text()):
            found.add((rel, m.group(1) or "REPO_ROOT ="))
    assert found - set(ALLOWED) == set(), "use control/defaults.py rather than repeating the default"
    assert set(ALLOWED) <= found, "an allowed literal is gone: drop it from ALLOWED"


def test_the_server_help_lists_the_settings():
    r = subprocess.run([sys.executable, "-m", "recserve.control.server", "--help"], capture_output=True, text=True,
                       timeout=60, cwd=str(ROOT))
    assert r.returncode == 0 and "--settings" in r.stdout and "--health-interval" in r.stdout, r.stderr
