"""``recctl k8s ...``: the operator's fleet and ModelRollouts through the Kubernetes API (kubeconfig/context).

It reads and writes the same objects ``kubectl get recservefleets,modelrollouts`` shows; starting a rollout is
creating a ModelRollout, aborting one (rollback) is deleting it. The kubernetes client is imported lazily so
recctl runs without the deploy extra. Output, ``--dry-run`` and exit codes are recctl's (control/api/cli_output.py):
errors reach recctl's main, which maps them (no kubeconfig or no API answer: 3; a refused call: 1).
"""

from __future__ import annotations

import argparse
import time

from rich.markup import escape
from rich.table import Table

from recserve.control.api.cli_output import (
    FAILED,
    OK,
    OperationFailed,
    Output,
    UsageError,
    add_command,
    dry_run_doc,
    existing_file,
    float_range,
    int_range,
    model_name,
    nonempty,
    percent_list,
    positive_seconds,
)

COLUMNS = ("name", "model", "from", "to", "strategy", "phase", "result", "canary", "gate", "message")
#: ModelRollout results that are not final yet.
RUNNING = (None, "Pending", "Running")


def _api(args: argparse.Namespace):
    """The KubeApi of --kubeconfig/--context/--namespace: the one way these commands reach the cluster."""
    from recserve.control.kube.api import KubeApi, api_client

    return KubeApi(api_client(str(args.kubeconfig) if args.kubeconfig else None, args.context), args.namespace)


def _row(cr: dict) -> dict:
    st, spec = cr.get("status") or {}, cr.get("spec") or {}
    return {"name": cr["metadata"]["name"], "model": spec.get("model"), "from": st.get("fromVersion"),
            "to": spec.get("version"), "strategy": spec.get("strategy", "canary"), "phase": st.get("phase", ""),
            "result": st.get("result", "Pending"), "canary": st.get("canary", ""),
            "gate": st.get("failedGate", ""), "message": st.get("message", "")}


def _table(rows: list[dict]) -> Table:
    t = Table(*COLUMNS)
    for r in rows:
        t.add_row(*(escape(str(r[c] if r[c] is not None else "")) for c in COLUMNS))
    return t


def cmd_rollouts(args: argparse.Namespace) -> int:
    rows = [_row(cr) for cr in _api(args).rollouts()]
    args.out.emit(rows, lambda c: c.print(_table(rows)))
    return OK


def cmd_status(args: argparse.Namespace) -> int:
    st = _api(args).fleet(args.fleet).get("status") or {}

    def human(c) -> None:
        c.print(f"fleet {args.namespace}/{args.fleet}: {st.get('readyPods', 0)}/{st.get('pods', 0)} pods golden-ok;"
                f" versions {st.get('versionsText', '?')}")
        t = Table("pod", "role", "state", "golden-ok", "detail")
        for i in st.get("instances", []):
            t.add_row(i["pod"], i["role"], i["state"], str(i["goldenOk"]), escape(i.get("detail", "")))
        c.print(t)

    args.out.emit(st, human)
    return OK


def _progress(name: str, st: dict) -> str:
    """One line per change of a ModelRollout's status: phase, canary weight, gate values, result, message."""
    history = st.get("history") or []
    weight = history[-1].get("weight") if history else None
    gates = " ".join(f"{k}={float(v):.3g}" for k, v in sorted((st.get("gates") or {}).items()))
    return (f"{time.strftime('%H:%M:%S')} {name} [bold]{st.get('phase') or 'pending':<9}[/bold] "
            + (f"{weight:>3}%  " if weight is not None else "")
            + f"{st.get('result') or 'Pending'}  {escape(st.get('message') or '')}  {gates}").rstrip()


def cmd_rollover(args: argparse.Namespace) -> int:
    from recserve.control.kube.api import GROUP, ROLLOUTS, VERSION

    out: Output = args.out
    if args.steps and args.strategy == "canary" and (args.steps != sorted(set(args.steps)) or args.steps[-1] != 100):
        raise UsageError(f"--steps: {','.join(map(str, args.steps))} must be increasing percentages ending at 100")
    if args.dry_run and args.wait:
        raise UsageError("--wait: a --dry-run creates nothing to wait for")
    for flag, given in (("--timeout", args.wait_timeout), ("--poll", args.poll)):
        if given is not None and not args.wait:
            raise UsageError(f"{flag} goes with --wait")
    wait_s, poll_s = args.wait_timeout or 1800.0, args.poll or 1.0
    name = args.name or f"{args.model.replace('_', '-')}-v{args.version}-{time.strftime('%Y%m%d%H%M%S')}"
    spec: dict = {"fleet": args.fleet, "model": args.model, "version": args.version, "strategy": args.strategy}
    if args.steps:
        spec["steps"] = args.steps
    if args.bake is not None:
        spec["bakeSeconds"] = args.bake
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ModelRollout",
            "metadata": {"name": name, "namespace": args.namespace}, "spec": spec}
    if args.dry_run:
        out.emit(dry_run_doc("k8s rollover", would=f"create ModelRollout {args.namespace}/{name}", object=body),
                 f"would create ModelRollout {args.namespace}/{name}: {args.model} -> version {args.version} "
                 f"({args.strategy}" + (f", steps {args.steps}" if args.steps else "") + ")")
        return OK
    api = _api(args)
    created = api.custom.create_namespaced_custom_object(GROUP, VERSION, args.namespace, ROLLOUTS, body)
    if not args.wait:
        out.emit(created, f"ModelRollout {name} created")
        return OK
    out.progress(f"ModelRollout {name} created; waiting for its result (up to {wait_s:.0f} s)")
    deadline = time.monotonic() + wait_s
    cr, last = created, None
    while True:
        cr = api.custom.get_namespaced_custom_object(GROUP, VERSION, args.namespace, ROLLOUTS, name)
        st = cr.get("status") or {}
        line = _progress(name, st)
        seen = (st.get("phase"), st.get("result"), st.get("message"), st.get("gates"), len(st.get("history") or []))
        if seen != last:
            out.progress(line)
            last = seen
        if st.get("result") not in RUNNING:
            break
        if time.monotonic() >= deadline:
            out.emit(cr, f"{name}: still {st.get('result') or 'Pending'} after {wait_s:.0f}s")
            raise OperationFailed(f"ModelRollout {name} has no result after {wait_s:.0f} s (--timeout)")
        time.sleep(poll_s)
    r = _row(cr)
    out.emit(cr, f"{name}: [bold]{r['result']}[/bold]" + (f" (failed gate {r['gate']})" if r["gate"] else "")
             + f": {escape(r['message'] or '')}")
    return OK if st["result"] == "Succeeded" else FAILED


def cmd_rollback(args: argparse.Namespace) -> int:
    """Abort the running ModelRollout of MODEL: deleting it makes the operator roll back."""
    from recserve.control.kube.api import GROUP, ROLLOUTS, VERSION

    api = _api(args)
    running = [cr for cr in api.rollouts() if (cr.get("spec") or {}).get("model") == args.model
               and (cr.get("status") or {}).get("result") in RUNNING]
    if not running:
        raise OperationFailed(f"no running ModelRollout of {args.model!r}: start one back to the previous version "
                              "instead (recctl k8s rollover)")
    names = [cr["metadata"]["name"] for cr in running]
    doc = {"model": args.model, "deleted": names}
    if args.dry_run:
        args.out.emit(dry_run_doc("k8s rollback", model=args.model, would_delete=names),
                      f"would delete ModelRollout {', '.join(names)}: the operator would roll {args.model} back")
        return OK
    for n in names:
        api.custom.delete_namespaced_custom_object(GROUP, VERSION, args.namespace, ROLLOUTS, n)
    args.out.emit(doc, "\n".join(f"deleted ModelRollout {n}: the operator rolls {args.model} back" for n in names))
    return OK


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``recctl k8s {status,rollouts,rollover,rollback}``."""
    k = sub.add_parser("k8s", help="the recserve operator on Kubernetes (kubeconfig/context)",
                       description="the recserve operator on Kubernetes (kubeconfig/context)")
    k.add_argument("--kubeconfig", type=existing_file, help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
    k.add_argument("--context", type=nonempty("a kubeconfig context"), help="kubeconfig context")
    k.add_argument("--namespace", "-n", type=nonempty("a namespace"), default="recserve")
    k.add_argument("--fleet", type=nonempty("a RecServeFleet name"), default="recserve", help="RecServeFleet name")
    ks = k.add_subparsers(dest="k8s_command", required=True, metavar="COMMAND")

    def add(name: str, fn, help_: str, changes: bool = False) -> argparse.ArgumentParser:
        return add_command(ks, name, fn, help_, changes)

    add("status", cmd_status, "the fleet's pods, golden-ok gates and desired versions")
    add("rollouts", cmd_rollouts, "ModelRollouts with phase, result and failed gate")
    ro = add("rollover", cmd_rollover, "create a ModelRollout (--wait: follow it to its result)", changes=True)
    ro.add_argument("model", type=model_name)
    ro.add_argument("--version", type=int_range(1), required=True)
    ro.add_argument("--strategy", choices=("canary", "blue-green"), default="canary")
    ro.add_argument("--steps", type=percent_list, default=None, help="canary percentages ending at 100, e.g. 50,100")
    ro.add_argument("--bake", type=float_range(0, 3600, "seconds"), default=None, help="seconds per step")
    ro.add_argument("--name", type=nonempty("a ModelRollout name"))
    ro.add_argument("--wait", action="store_true", help="follow the rollout: each change of phase, weight and gates "
                    "on stderr, the result at the end (exit 1 unless Succeeded)")
    ro.add_argument("--timeout", dest="wait_timeout", metavar="SECONDS", type=positive_seconds, default=None,
                    help="seconds --wait waits (default 1800)")
    ro.add_argument("--poll", type=float_range(0.1, 60, "seconds"), default=None,
                    help="seconds between two reads of the ModelRollout while --wait (default 1)")
    rb = add("rollback", cmd_rollback, "abort the running ModelRollout of MODEL (the operator rolls back)",
             changes=True)
    rb.add_argument("model", type=model_name)
