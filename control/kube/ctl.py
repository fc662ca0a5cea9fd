"""``recctl k8s ...``: the operator's fleet and ModelRollouts through the Kubernetes API (kubeconfig/context).

It reads and writes the same objects ``kubectl get recservefleets,modelrollouts`` shows; starting a rollout is
creating a ModelRollout, aborting one (rollback) is deleting it. The kubernetes client is imported lazily so
recctl runs without the deploy extra.
"""

from __future__ import annotations

import argparse
import json
import time

from rich.console import Console
from rich.table import Table

console = Console()
COLUMNS = ("name", "model", "from", "to", "strategy", "phase", "result", "canary", "gate", "message")


def _api(args: argparse.Namespace):
    from recserve.control.kube.api import KubeApi, api_client

    return KubeApi(api_client(args.kubeconfig, args.context), args.namespace)


def _row(cr: dict) -> dict:
    st, spec = cr.get("status") or {}, cr.get("spec") or {}
    return {"name": cr["metadata"]["name"], "model": spec.get("model"), "from": st.get("fromVersion"),
            "to": spec.get("version"), "strategy": spec.get("strategy", "canary"), "phase": st.get("phase", ""),
            "result": st.get("result", "Pending"), "canary": st.get("canary", ""),
            "gate": st.get("failedGate", ""), "message": st.get("message", "")}


def cmd_rollouts(args: argparse.Namespace) -> int:
    rows = [_row(cr) for cr in _api(args).rollouts()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    t = Table(*COLUMNS)
    for r in rows:
        t.add_row(*(str(r[c] if r[c] is not None else "") for c in COLUMNS))
    console.print(t)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    st = _api(args).fleet(args.fleet).get("status") or {}
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    console.print(f"fleet {args.namespace}/{args.fleet}: {st.get('readyPods', 0)}/{st.get('pods', 0)} pods golden-ok;"
                  f" versions {st.get('versionsText', '?')}")
    t = Table("pod", "role", "state", "golden-ok", "detail")
    for i in st.get("instances", []):
        t.add_row(i["pod"], i["role"], i["state"], str(i["goldenOk"]), i.get("detail", ""))
    console.print(t)
    return 0


def cmd_rollover(args: argparse.Namespace) -> int:
    from recserve.control.kube.api import GROUP, ROLLOUTS, VERSION

    api = _api(args)
    name = args.name or f"{args.model.replace('_', '-')}-v{args.version}-{time.strftime('%Y%m%d%H%M%S')}"
    spec: dict = {"fleet": args.fleet, "model": args.model, "version": args.version, "strategy": args.strategy}
    if args.steps:
        spec["steps"] = [int(s) for s in args.steps.split(",")]
    if args.bake is not None:
        spec["bakeSeconds"] = args.bake
    api.custom.create_namespaced_custom_object(GROUP, VERSION, args.namespace, ROLLOUTS, {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "ModelRollout",
        "metadata": {"name": name, "namespace": args.namespace}, "spec": spec})
    console.print(f"ModelRollout {name} created")
    if not args.wait:
        return 0
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        st = api.custom.get_namespaced_custom_object(GROUP, VERSION, args.namespace, ROLLOUTS, name).get("status")
        if st and st.get("result") not in (None, "Pending", "Running"):
            console.print(f"{name}: {st['result']}: {st.get('message', '')}")
            return 0 if st["result"] == "Succeeded" else 1
        time.sleep(1)
    console.print(f"{name}: still running after {args.timeout:.0f}s")
    return 1


def cmd_rollback(args: argparse.Namespace) -> int:
    """Abort the running ModelRollout of MODEL: deleting it makes the operator roll back."""
    from recserve.control.kube.api import GROUP, ROLLOUTS, VERSION

    api = _api(args)
    running = [cr for cr in api.rollouts() if (cr.get("spec") or {}).get("model") == args.model
               and (cr.get("status") or {}).get("result") in ("Running", "Pending")]
    if not running:
        console.print(f"no running ModelRollout of {args.model!r}: start one back to the previous version instead")
        return 2
    for cr in running:
        api.custom.delete_namespaced_custom_object(GROUP, VERSION, args.namespace, ROLLOUTS, cr["metadata"]["name"])
        console.print(f"deleted ModelRollout {cr['metadata']['name']}: the operator rolls {args.model} back")
    return 0


def _guard(fn):
    """Kubernetes API errors as one clear line (recctl's main only knows gRPC errors)."""

    def run(args: argparse.Namespace) -> int:
        from kubernetes.client.exceptions import ApiException
        from kubernetes.config import ConfigException

        try:
            return fn(args)
        except ApiException as exc:
            console.print(f"[red]recctl k8s:[/red] Kubernetes API answered {exc.status} {exc.reason}: "
                          f"{(exc.body or '')[:300]}")
        except ConfigException as exc:
            console.print(f"[red]recctl k8s:[/red] no usable kubeconfig: {exc}")
        return 2

    return run


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``recctl k8s {status,rollouts,rollover,rollback}``."""
    k = sub.add_parser("k8s", help="the recserve operator on Kubernetes (kubeconfig/context)")
    k.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
    k.add_argument("--context", help="kubeconfig context")
    k.add_argument("--namespace", "-n", default="recserve")
    k.add_argument("--fleet", default="recserve", help="RecServeFleet name")
    ks = k.add_subparsers(dest="k8s_command", required=True)

    def add(name: str, fn, help_: str) -> argparse.ArgumentParser:
        sp = ks.add_parser(name, help=help_)
        sp.add_argument("--json", action="store_true")
        sp.set_defaults(fn=_guard(fn))
        return sp

    add("status", cmd_status, "the fleet's pods, golden-ok gates and desired versions")
    add("rollouts", cmd_rollouts, "ModelRollouts with phase, result and failed gate")
    ro = add("rollover", cmd_rollover, "create a ModelRollout")
    ro.add_argument("model")
    ro.add_argument("--version", type=int, required=True)
    ro.add_argument("--strategy", choices=("canary", "blue-green"), default="canary")
    ro.add_argument("--steps", default="", help="e.g. 50,100")
    ro.add_argument("--bake", type=float, default=None)
    ro.add_argument("--name")
    ro.add_argument("--wait", action="store_true", help="wait for the result (exit 1 unless Succeeded)")
    ro.add_argument("--timeout", type=float, default=1800)
    rb = add("rollback", cmd_rollback, "abort the running ModelRollout of MODEL (the operator rolls back)")
    rb.add_argument("model")
