"""The local webhook receiver: records what Alertmanager would have paged, one JSON line per notification.

Why a process of its own: Alertmanager needs a real HTTP endpoint to deliver to, and drills need the moment a
notification arrived (time-to-alert) from something outside the control plane they are testing.
Run: ``python -m recserve.control.monitoring.alertsink --port N --out FILE`` (loopback only); ``AlertReceiver`` owns it.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

MAX_BODY = 1 << 20


def make_handler(out: Path):
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            n = int(self.headers.get("Content-Length") or 0)
            if n > MAX_BODY:
                self.send_error(413, f"body of {n} bytes is over the {MAX_BODY} limit")
                return
            try:
                payload = json.loads(self.rfile.read(n) or b"{}")
            except ValueError as exc:
                self.send_error(400, f"body is not JSON: {exc}")
                return
            line = json.dumps({"received": time.time(), "receiver": self.path.strip("/") or "default",
                               "payload": payload})
            with lock, out.open("a") as fh:
                fh.write(line + "\n")
            self.send_response(200)
            self.end_headers()

        def do_GET(self) -> None:  # noqa: N802
            body = b"ok\n" if self.path == "/-/ready" else (out.read_bytes() if out.exists() else b"")
            self.send_response(200)
            self.send_header("Content-Type", "text/plain" if self.path == "/-/ready" else "application/x-ndjson")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    return Handler


def read_notifications(path: Path) -> list[dict]:
    """Every recorded notification, flattened to one row per alert: received, receiver, status, name, labels."""
    rows: list[dict] = []
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            n = json.loads(line)
        except ValueError:
            continue
        for a in n["payload"].get("alerts", []):
            rows.append({"received": n["received"], "receiver": n["receiver"], "status": a.get("status"),
                         "alertname": a.get("labels", {}).get("alertname"), "labels": a.get("labels", {}),
                         "startsAt": a.get("startsAt"), "endsAt": a.get("endsAt")})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recserve.control.monitoring.alertsink",
                                description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--out", type=Path, required=True, help="JSON-lines file of received notifications")
    args = p.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(args.out))
    print(f"alert receiver on http://{args.host}:{args.port} -> {args.out}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
