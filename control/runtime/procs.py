"""Process and port helpers shared by every class that owns a process (tritonserver, HAProxy, control plane)."""

from __future__ import annotations

import os
import signal
import socket


def pid_alive(pid: int) -> bool:
    """True for a running (not zombie) process; a pid we may not signal counts as alive."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return False


def cmdline(pid: int) -> str:
    """The command line of ``pid``, arguments joined by spaces; "" when it is gone or unreadable. The one check
    that a pid from a pid file is still the process we think (its command line names our root, binary or config)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def can_raise_priority() -> bool:
    """Whether this process may lower a niceness it raised (root, or RLIMIT_NICE up to nice 0). Without that, an
    instance loaded at nice 19 would stay there once it serves, so callers leave it at 0."""
    import resource

    return os.geteuid() == 0 or resource.getrlimit(resource.RLIMIT_NICE)[0] >= 20


def kill_group(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal the process group led by ``pid`` (children such as backend stubs too), else the pid alone."""
    if pid <= 0:
        return
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel says is free now (small race, acceptable for tests and local fleets)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True when ``port`` cannot be bound (someone holds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def port_listening(port: int, host: str = "127.0.0.1", timeout_s: float = 0.2) -> bool:
    """True once something accepts TCP connections on ``port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(timeout_s)
        return s.connect_ex((host, port)) == 0
