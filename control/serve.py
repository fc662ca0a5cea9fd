"""``make serve``: one embedded Triton server in the foreground with the whole repository loaded."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from recserve.control.defaults import DEFAULT_REPOSITORY, GRPC_PORT, HTTP_PORT, REPO_ROOT
from recserve.control.runtime.triton import TritonConfig, TritonError, TritonServer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run one embedded Triton server until Ctrl-C.")
    p.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY, help="model repository")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    p.add_argument("--http-port", type=int, default=HTTP_PORT)
    p.add_argument("--grpc-port", type=int, default=GRPC_PORT)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--model", action="append", dest="models", help="load only this model (repeatable)")
    p.add_argument("--workdir", type=Path, default=REPO_ROOT / ".recserve" / "serve")
    args = p.parse_args(argv)
    server = TritonServer(
        TritonConfig(
            model_repository=args.repository.resolve(),
            workdir=args.workdir,
            host=args.host,
            http_port=args.http_port,
            grpc_port=args.grpc_port,
            metrics_port=args.metrics_port,
            models=args.models,
            name="serve",
        )
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        print(f"starting tritonserver (log: {server.log_path}) ...", flush=True)
        server.start()
    except TritonError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        loaded = server.loaded_versions()
        print(f"ready: HTTP {server.http_url}  gRPC {server.grpc_url}  metrics {server.metrics_url}")
        for name, versions in sorted(loaded.items()):
            print(f"  {name:<18} versions {versions}")
        print("Ctrl-C to stop.", flush=True)
        while not stop.wait(1.0):
            if not server.is_alive():
                print(f"error: tritonserver exited: {server.load_errors()}", file=sys.stderr)
                return 1
    finally:
        server.stop()
        print("stopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
