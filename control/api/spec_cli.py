"""``recctl init`` and ``recctl spec validate``: the serving spec from the command line, no control plane needed."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from recserve.control.api.cli_output import OK, OperationFailed, Output, UsageError, existing_dir, existing_file
from recserve.control.spec.repository import RepositoryReadError
from recserve.control.spec.spec import SpecError


def _golden_pair(text: str) -> tuple[str, Path]:
    model, sep, path = text.partition("=")
    if not (sep and model and path):
        raise argparse.ArgumentTypeError(f"{text!r} is not MODEL=FILE")
    return model, Path(path)


def cmd_init(args: argparse.Namespace) -> int:
    from recserve.control.spec.init import init_spec

    out: Output = args.out
    golden = dict(args.golden or [])
    for model, path in golden.items():
        if not path.is_file():
            raise UsageError(f"--golden {model}={path}: no such file")
    if args.out_spec.exists() and not args.force:
        raise UsageError(f"--out {args.out_spec}: exists (pass --force to overwrite it)")
    try:
        res = init_spec(args.repository, args.out_spec, golden, n_requests=args.requests)
    except (SpecError, RepositoryReadError) as exc:
        raise OperationFailed(f"init refused: {exc}") from None
    doc = {"spec": str(res.spec_path), "models": res.models, "notes": res.notes}
    out.emit(doc, lambda c: (c.print(f"wrote {res.spec_path} for {', '.join(res.models)}"),
                             [c.print(f"  {n}") for n in res.notes],
                             c.print(f"next: review the guessed fields, then recctl spec validate {res.spec_path}")))
    return OK


def cmd_spec(args: argparse.Namespace) -> int:
    from recserve.control.spec.spec import load_spec

    out: Output = args.out
    try:
        spec = load_spec(args.spec, args.repository)
    except (SpecError, RepositoryReadError) as exc:
        raise OperationFailed(f"invalid serving spec: {exc}") from None
    doc = {"spec": str(spec.path), "repository": str(spec.repository), "warnings": list(spec.warnings),
           "models": {n: {"steps": list(m.steps), "golden_requests": len(m.golden), "expected": m.expected,
                          "outputs": {o: r.compare for o, r in m.outputs.items()}, "slo_p99_ms": m.slo_p99_ms}
                      for n, m in spec.models.items()}}
    out.emit(doc, lambda c: (c.print(f"ok: {spec.path} guards {', '.join(spec.models)} in {spec.repository}"),
                             [c.print(f"  warning: {w}") for w in spec.warnings]))
    return OK


def cmd_release(args: argparse.Namespace) -> int:
    from recserve.control.spec.release import release
    from recserve.control.spec.spec import load_spec

    out: Output = args.out
    if not (args.spec or args.repository):
        raise UsageError("release: give --spec (checks the golden requests too) or --repository")
    try:
        spec = load_spec(args.spec, args.repository) if args.spec else None
        repository = spec.repository if spec else args.repository
        if args.dry_run:
            from recserve.control.spec.release import check_onnx
            from recserve.control.spec.repository import read_repository

            models = read_repository(repository)
            if args.model not in models:
                raise SpecError(f"no model {args.model!r} in {repository}")
            checked = check_onnx(args.onnx, models[args.model])
            out.emit({"dry_run": True, "model": args.model, "checked": checked},
                     lambda c: [c.print(f"ok: {line}") for line in checked])
            return OK
        rel = release(repository, args.model, args.onnx, spec)
    except (SpecError, RepositoryReadError) as exc:
        raise OperationFailed(f"release refused: {exc}") from None
    doc = {"model": rel.model, "version": rel.version, "path": str(rel.path), "checked": rel.checked,
           "drift": rel.drift}

    def human(c) -> None:
        c.print(f"released {rel.model} version {rel.version} at {rel.path}")
        for line in rel.checked:
            c.print(f"  checked: {line}")
        for name, d in rel.drift.items():
            verdict = "within its gate" if d["passes"] else "BEYOND its gate: a rollout would roll it back"
            c.print(f"  drift of {name} from version {d['from_version']}: {d['value']} by {d['by']} "
                    f"(minimum {d['min']}): {verdict}")
        c.print("  TensorRT: not built here (needs a GPU host: make build-engines); untested until a GPU run")
        c.print(f"next: recctl rollover {rel.model} --version {rel.version}")

    out.emit(doc, human)
    return OK


def add_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    """Register ``init`` and ``spec`` with recctl's ``add(name, fn, help, changes)``."""
    ini = add("init", cmd_init, "write a starter serving spec (and golden requests) for a Triton repository")
    ini.add_argument("--repository", type=existing_dir, required=True, help="the Triton model repository")
    ini.add_argument("--out", dest="out_spec", type=Path, required=True, help="the spec file to write")
    ini.add_argument("--golden", type=_golden_pair, action="append", metavar="MODEL=FILE",
                     help="golden requests for MODEL in perf_analyzer's --input-data layout (repeatable); "
                     "without one, init makes requests from the input ranges")
    ini.add_argument("--requests", type=int, default=8, help="golden requests init makes per model")
    ini.add_argument("--force", action="store_true", help="overwrite --out")
    rel = add("release", cmd_release, "write a NEW version of an ONNX model from a file, checked against its config "
              "and (with --spec) the golden requests through the reference", changes=True)
    rel.add_argument("model", help="the model (a directory of the repository)")
    rel.add_argument("--onnx", type=existing_file, required=True, help="the ONNX file of the new version")
    rel.add_argument("--spec", type=existing_file, default=None, help="serving spec: golden requests and drift gate")
    rel.add_argument("--repository", type=existing_dir, default=None, help="the repository (default: the spec's)")
    sp = add("spec", cmd_spec, "check a serving spec against its repository (nothing is started)")
    sp.add_argument("action", choices=("validate",))
    sp.add_argument("spec", type=existing_file, help="the serving spec (YAML)")
    sp.add_argument("--repository", type=existing_dir, default=None, help="override the spec's repository")
