"""A data path with one instance behind a link the drill can cut: the network-partition drill's own fleet.

Why its own: the control plane starts every instance on host loopback, and a loopback link cannot be cut
(no iptables, no tc netem here). So this drill builds the smallest honest setup itself: a network namespace
with a veth pair to the host, the primary tritonserver inside it, a standby on loopback, and HAProxy with
the same health-check and retry settings as the fleet (see shared/notes/runtime.md). The partition is
``ip link set <veth> down`` inside the namespace; detection is HAProxy marking the server DOWN.
Everything is torn down in ``close`` (processes by pid, then the namespace, which removes the veth pair).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

from recserve.control.routing.haproxy import HAProxyError, parse_stat, runtime_exchange
from recserve.control.runtime.triton import TritonConfig, TritonServer, free_port


def ip(*args: str, netns: str | None = None) -> subprocess.CompletedProcess:
    cmd = (["ip", "netns", "exec", netns] if netns else []) + ["ip", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=10)


class NetnsTriton(TritonServer):
    """A tritonserver started inside ``netns`` (listening there on all interfaces: that namespace holds only
    its own loopback and our veth end) and reached from the host at ``address``."""

    def __init__(self, config: TritonConfig, netns: str, address: str):
        super().__init__(config)
        self.netns, self.address = netns, address

    def command(self, backend_dir: Path) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *super().command(backend_dir)]

    @property
    def http_url(self) -> str:
        return f"{self.address}:{self.config.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.address}:{self.config.grpc_port}"


class PartitionedPath:
    def __init__(self, repository: Path, workdir: Path):
        n = os.getpid() % 100000
        self.netns, self.host_if, self.ns_if = f"rsd{n}", f"rsdh{n}", f"rsdn{n}"
        octet = 1 + n % 250
        self.host_ip, self.ns_ip = f"10.213.{octet}.1", f"10.213.{octet}.2"
        self.repository, self.workdir = repository, workdir
        self.inside: NetnsTriton | None = None
        self.outside: TritonServer | None = None
        self.haproxy: subprocess.Popen | None = None
        self.grpc_port = 0
        self.socket = workdir / "haproxy.sock"
        self.made_netns = False

    # ------------------------------------------------------------------ setup
    def _netns(self) -> None:
        r = ip("netns", "add", self.netns)
        if r.returncode != 0:
            raise OSError(f"ip netns add {self.netns}: {r.stderr.strip()}")
        self.made_netns = True
        steps = [(("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if), None),
                 (("link", "set", self.ns_if, "netns", self.netns), None),
                 (("addr", "add", f"{self.host_ip}/30", "dev", self.host_if), None),
                 (("link", "set", self.host_if, "up"), None),
                 (("addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if), self.netns),
                 (("link", "set", self.ns_if, "up"), self.netns),
                 (("link", "set", "lo", "up"), self.netns)]
        for args, ns in steps:
            r = ip(*args, netns=ns)
            if r.returncode != 0:
                raise OSError(f"ip {' '.join(args)}: {r.stderr.strip()}")

    def _haproxy_config(self) -> str:
        a, b = self.inside.config, self.outside.config
        chk = "check-proto h1 inter 200ms fall 2 rise 2"
        return "\n".join([
            "global", f"  stats socket {self.socket} mode 600 level admin", "",
            "defaults", "  mode http", "  timeout connect 200ms", "  timeout client 30s", "  timeout server 1s",
            "  timeout check 150ms", "  retries 3", "  option redispatch 1", "",
            "frontend grpc_in", f"  bind 127.0.0.1:{self.grpc_port} proto h2", "  default_backend tritons", "",
            "backend tritons", "  balance first", "  option httpchk GET /v2/health/ready",
            "  http-check expect status 200", "  retry-on conn-failure empty-response response-timeout",
            f"  server inside {self.ns_ip}:{a.grpc_port} proto h2 check port {a.http_port} {chk}",
            f"  server outside 127.0.0.1:{b.grpc_port} proto h2 check port {b.http_port} {chk}", ""])

    def start(self) -> PartitionedPath:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._netns()
        common = {"model_repository": self.repository, "models": ["recommend", "search"]}
        self.inside = NetnsTriton(TritonConfig(workdir=self.workdir / "inside", host="0.0.0.0", name="inside",
                                               http_port=free_port(), grpc_port=free_port(),
                                               metrics_port=free_port(), **common), self.netns, self.ns_ip)
        self.outside = TritonServer(TritonConfig(workdir=self.workdir / "outside", name="outside", **common))
        self.inside.start(wait=False)
        self.outside.start(wait=True)
        self.inside.wait_ready()
        self.grpc_port = free_port()
        cfg = self.workdir / "haproxy.cfg"
        cfg.write_text(self._haproxy_config())
        log = open(self.workdir / "haproxy.log", "wb")
        self.haproxy = subprocess.Popen([shutil.which("haproxy") or "haproxy", "-db", "-f", str(cfg)], stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and self.server_status("inside") != "UP":
            if self.haproxy.poll() is not None:
                raise OSError(f"haproxy exited: {(self.workdir / 'haproxy.log').read_text()[-400:]}")
            time.sleep(0.1)
        return self

    # ------------------------------------------------------------------ fault and observation
    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def cut(self) -> None:
        r = ip("link", "set", self.ns_if, "down", netns=self.netns)
        if r.returncode != 0:
            raise OSError(f"cutting the link: {r.stderr.strip()}")

    def restore(self) -> bool:
        return ip("link", "set", self.ns_if, "up", netns=self.netns).returncode == 0

    def server_status(self, server: str) -> str:
        """HAProxy's status of ``server`` (UP, DOWN, 'DOWN 1/2', ...), '' when the socket does not answer."""
        try:
            rows = parse_stat(runtime_exchange(self.socket, "show stat", timeout_s=1.0, check=False))
        except HAProxyError:
            return ""
        return next((r.get("status", "") for r in rows if r.get("pxname") == "tritons" and r.get("svname") == server),
                    "")

    def watch(self, server: str, want: str, since: float, timeout_s: float) -> threading.Thread:
        """Record in ``self.seen[want]`` the wall time HAProxy first reports ``server`` as ``want``."""
        self.seen: dict[str, float] = getattr(self, "seen", {})

        def loop() -> None:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if self.server_status(server) == want:
                    self.seen[want] = time.time()
                    return
                time.sleep(0.05)

        t = threading.Thread(target=loop, daemon=True)
        t.start()
        return t

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        if self.haproxy is not None and self.haproxy.poll() is None:
            os.killpg(self.haproxy.pid, signal.SIGKILL)
            self.haproxy.wait(10)
        for srv in (self.inside, self.outside):
            if srv is not None:
                srv.stop(timeout_s=5)
        if self.made_netns:
            ip("netns", "delete", self.netns)  # removes the veth pair with it
            ip("link", "delete", self.host_if)  # in case the namespace went first
            self.made_netns = False
