"""The monitoring stack of one fleet: webhook receiver, Alertmanager, Prometheus (``make monitor-up/-down``).

Files live under ``<root>/monitoring/`` (runtime configs, TSDB, logs, pid files, ``endpoints.json`` that
``recctl status`` prints); Prometheus reads the file_sd targets the control plane keeps in
``<root>/monitoring/targets/``. Drills run a stack of their own in a scratch dir with ``fast=True``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from recserve.control.monitoring.alertsink import read_notifications
from recserve.control.monitoring.config import (
    DASHBOARD,
    DEPLOY_DIR,
    published_models,
    render_alertmanager,
    render_dashboard,
    render_prometheus,
    write_runtime_rules,
    write_yaml,
)
from recserve.control.monitoring.targets import targets_dir
from recserve.control.runtime.promstack import Alertmanager, AlertReceiver, MonitorError, ProcConfig, Prometheus, binary
from recserve.control.runtime.triton import REPO_ROOT


@dataclass
class MonitorConfig:
    root: Path = REPO_ROOT / ".recserve"
    #: Where the stack's own files go (default <root>/monitoring).
    workdir: Path | None = None
    prometheus_port: int = 0
    alertmanager_port: int = 0
    receiver_port: int = 0
    fast: bool = False
    deploy_dir: Path = DEPLOY_DIR

    @property
    def dir(self) -> Path:
        return Path(self.workdir or Path(self.root) / "monitoring")


def missing_binaries() -> list[str]:
    """Debian packages the stack needs that are not installed (empty when all are there)."""
    out = []
    if not binary("prometheus"):
        out.append("prometheus")
    if not (binary("prometheus-alertmanager") or binary("alertmanager")):
        out.append("prometheus-alertmanager")
    return out


class MonitorStack:
    """Starts (or adopts) receiver -> Alertmanager -> Prometheus, and stops them in reverse order."""

    def __init__(self, config: MonitorConfig):
        self.config = config
        d = config.dir
        self.receiver = AlertReceiver(ProcConfig(d / "receiver", config.receiver_port))
        self.alertmanager = Alertmanager(ProcConfig(d / "alertmanager", config.alertmanager_port))
        self.prometheus = Prometheus(ProcConfig(d / "prometheus", config.prometheus_port))

    @property
    def procs(self):
        return (self.receiver, self.alertmanager, self.prometheus)

    @property
    def endpoints_path(self) -> Path:
        return self.config.dir / "endpoints.json"

    def endpoints(self) -> dict[str, str]:
        return {"prometheus": self.prometheus.url, "alertmanager": self.alertmanager.url,
                "receiver": self.receiver.url, "notifications": str(self.receiver.out),
                "scrape_interval": "1s" if self.config.fast else "deploy/monitoring/prometheus.yml"}

    def up(self) -> dict[str, str]:
        """Idempotent: adopts running processes, starts the missing ones; returns the URLs."""
        missing = missing_binaries()
        if missing:
            raise MonitorError(f"not installed: {', '.join(missing)} (run 'make setup')")
        c = self.config
        try:
            if not self.receiver.adopt():
                self.receiver.start()
            if not self.alertmanager.adopt():
                write_yaml(self.alertmanager.config.workdir / "alertmanager.yml",
                           render_alertmanager(f"127.0.0.1:{self._port(self.receiver)}", c.fast, c.deploy_dir))
                self.alertmanager.start()
            if not self.prometheus.adopt():
                targets_dir(c.root).mkdir(parents=True, exist_ok=True)
                self.prometheus.config.port = self._port(self.prometheus)
                write_yaml(self.prometheus.config.workdir / "prometheus.yml",
                           render_prometheus(targets_dir(c.root), f"127.0.0.1:{self.alertmanager.config.port}",
                                             c.fast, c.deploy_dir, self.runtime_rules()))
                self.prometheus.start()
        except BaseException:
            self.down()
            raise
        self.endpoints_path.write_text(json.dumps(self.endpoints(), indent=2))
        return self.endpoints()

    def runtime_rules(self) -> list[Path] | None:
        """For a fleet that published its models (a spec fleet: ``<root>/monitoring/models.json``), rule files and a
        dashboard selecting those models, written under the stack's dir; None: the committed ones (the demo's)."""
        c = self.config
        rules_dir, dashboard = self.prometheus.config.workdir / "rules", c.dir / DASHBOARD
        try:
            models = published_models(c.root)
        except ValueError as exc:
            raise MonitorError(str(exc)) from None
        if models is None:
            for f in rules_dir.glob("*.yml"):  # a spec fleet's leftovers: never read by this Prometheus
                f.unlink()
            dashboard.unlink(missing_ok=True)
            return None
        dashboard.parent.mkdir(parents=True, exist_ok=True)
        dashboard.write_text(json.dumps(render_dashboard(models, c.deploy_dir), indent=2) + "\n")
        return write_runtime_rules(rules_dir, models, c.deploy_dir)

    @staticmethod
    def _port(proc) -> int:
        from recserve.control.runtime.procs import free_port

        if not proc.config.port:
            proc.config.port = free_port(proc.config.host)
        return proc.config.port

    def down(self) -> list[str]:
        """Stop what is running (started here or adopted through pid files); returns what was stopped."""
        stopped = []
        for p in reversed(self.procs):
            if p.process is None:
                p.adopt()
            if p.is_alive():
                stopped.append(p.name)
            p.stop()
        self.endpoints_path.unlink(missing_ok=True)
        return stopped

    def notifications(self) -> list[dict]:
        return read_notifications(self.receiver.out)

    def cpu_seconds(self) -> dict[str, float | None]:
        return {p.name: p.cpu_seconds() for p in self.procs}


def read_endpoints(root: Path) -> dict[str, str]:
    """The URLs of a running stack for ``recctl status`` ({} when none was started or its Prometheus is gone)."""
    stack = MonitorStack(MonitorConfig(root=Path(root)))
    try:
        ep = json.loads(stack.endpoints_path.read_text())
    except (OSError, ValueError):
        return {}
    return ep if stack.prometheus.adopt() else {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recserve.control.monitoring.stack", description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=Path(os.environ.get("RECSERVE_ROOT", REPO_ROOT / ".recserve")))
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start (or adopt) receiver, Alertmanager, Prometheus on loopback")
    up.add_argument("--prometheus-port", type=int, default=int(os.environ.get("PORT_PROMETHEUS", 9090)))
    up.add_argument("--alertmanager-port", type=int, default=int(os.environ.get("PORT_ALERTMANAGER", 9093)))
    up.add_argument("--receiver-port", type=int, default=int(os.environ.get("PORT_ALERT_RECEIVER", 9095)))
    up.add_argument("--fast", action="store_true", help="1 s scrape/evaluation, no notification batching")
    sub.add_parser("down", help="stop the stack of this root")
    sub.add_parser("status", help="print the stack's URLs as JSON")
    args = p.parse_args(argv)
    root = args.root.resolve()
    if args.command == "up":
        stack = MonitorStack(MonitorConfig(root=root, prometheus_port=args.prometheus_port,
                                           alertmanager_port=args.alertmanager_port,
                                           receiver_port=args.receiver_port, fast=args.fast))
        try:
            ep = stack.up()
        except MonitorError as exc:
            print(f"monitor-up: {exc}", file=sys.stderr)
            return 1
        print(f"monitoring up: Prometheus {ep['prometheus']}, Alertmanager {ep['alertmanager']}, "
              f"receiver {ep['receiver']} (notifications: {ep['notifications']}); targets {targets_dir(root)}")
        return 0
    stack = MonitorStack(MonitorConfig(root=root))
    if args.command == "down":
        stopped = stack.down()
        print(f"monitoring down: stopped {', '.join(stopped) or 'nothing (none was running)'}")
        return 0
    print(json.dumps(read_endpoints(root), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
