"""What every ``recctl`` command shares: output formats, exit codes, typed errors and parse-time argument types.

Output: ``-o json|yaml|table`` (``--json`` is ``-o json``). With json or yaml, stdout holds exactly one document
(a streaming command prints its progress on stderr and one document at the end); errors, warnings and progress
always go to stderr, whatever the format.

Exit codes (this table is also in ``recctl --help``):

====  ====================================================================================================
code  meaning
====  ====================================================================================================
0     ok
1     the operation failed, or its verdict is negative: a rolled-back or failed rollout, a backup that
      failed verification, a refused call (permission, precondition, not found), a fleet that did not come up
2     usage: an unknown command or flag, a bad value (named at parse time), a value the control plane
      refused as invalid (INVALID_ARGUMENT)
3     the control plane cannot be reached: no control plane at the address, a failed TLS handshake, no
      token file in --root (no fleet there), no usable kubeconfig or no answer from the Kubernetes API
====  ====================================================================================================

:func:`classify` is the one place that turns an exception into a code and a one-line message; commands raise
the typed errors below (or let gRPC, Kubernetes and backup errors through) and never pick a code themselves.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

import yaml
from rich.console import Console
from rich.markup import escape

# parse-time argument types: control/argtypes.py (shared with control/settings.py)
from recserve.control.argtypes import (  # noqa: F401 (re-exported: recctl's commands import them from here)
    existing_dir,
    existing_file,
    float_range,
    instance_id,
    int_range,
    model_name,
    nonempty,
    percent_list,
    port,
    positive_seconds,
)

OK, FAILED, USAGE, UNREACHABLE = 0, 1, 2, 3
FORMATS = ("table", "json", "yaml")

EXIT_CODES_HELP = """exit codes:
  0  ok
  1  the operation failed or its verdict is negative (a rolled-back or failed rollout, a backup that failed
     verification, a refused call, a fleet that did not come up)
  2  usage: unknown command or flag, a bad value (named), a value the control plane refused as invalid
  3  the control plane cannot be reached (no control plane at the address, TLS handshake failed, no token
     file in --root, no usable kubeconfig, Kubernetes API not answering)

output: -o json|yaml prints one document on stdout and nothing else there; errors, warnings and progress
(every --wait, rollover's stream) go to stderr."""


# ---------------------------------------------------------------------------------------------- typed errors
class CliError(Exception):
    """An error with its exit code; the message is one line for stderr (``recctl: `` is prefixed)."""

    code = FAILED


class OperationFailed(CliError):
    code = FAILED


class UsageError(CliError):
    code = USAGE


class Unreachable(CliError):
    code = UNREACHABLE


def classify(exc: BaseException, control: str = "the control plane") -> tuple[int, str]:
    """The exit code and the stderr line for ``exc``: the only place recctl maps errors to codes."""
    if isinstance(exc, CliError):
        return exc.code, str(exc)
    import grpc

    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        code, details = exc.code(), exc.details() or ""
        low = details.lower()
        if code == grpc.StatusCode.UNAVAILABLE and ("ssl" in low or "handshake" in low):
            return UNREACHABLE, (f"TLS handshake with the control plane at {control} failed: is --ca (or "
                                 f"endpoints.json's control_ca) the CA of its certificate? ({details})")
        if code == grpc.StatusCode.UNAVAILABLE and ("connect" in low or "unreachable" in low or "dns" in low):
            return UNREACHABLE, f"no control plane at {control} (run 'make fleet-up' or 'recctl up')"
        if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE):
            return USAGE, f"{code.name}: {details}"
        return FAILED, f"{code.name}: {details}"
    from recserve.control.keys import SecretFileError

    if isinstance(exc, SecretFileError):
        return USAGE, str(exc)
    kube_cfg = sys.modules.get("kubernetes.config.config_exception")
    if kube_cfg is not None and isinstance(exc, kube_cfg.ConfigException):
        return UNREACHABLE, f"no usable kubeconfig: {exc}"
    kube_exc = sys.modules.get("kubernetes.client.exceptions")
    if kube_exc is not None and isinstance(exc, kube_exc.ApiException):
        text = f"Kubernetes API answered {exc.status} {exc.reason}: {(exc.body or '')[:300]}"
        if not exc.status:
            return UNREACHABLE, text
        return (USAGE if exc.status in (400, 422) else FAILED), text
    urllib3_exc = sys.modules.get("urllib3.exceptions")
    if urllib3_exc is not None and isinstance(exc, urllib3_exc.HTTPError):
        return UNREACHABLE, f"the Kubernetes API does not answer: {exc}"
    from recserve.control.backup.policy import BackupError
    from recserve.control.backup.targets import TargetError

    if isinstance(exc, BackupError | TargetError | OSError):
        return FAILED, str(exc)
    return FAILED, f"{type(exc).__name__}: {exc}"


# ---------------------------------------------------------------------------------------------- output
def _width() -> int | None:
    return None if sys.stdout.isatty() else 160  # wide tables also when piped (rich would wrap at 80)


class Output:
    """Where a command's result goes: one json/yaml document or a human view on stdout; the rest on stderr."""

    def __init__(self, fmt: str = "table"):
        if fmt not in FORMATS:
            raise UsageError(f"-o: {fmt!r} is not one of {', '.join(FORMATS)}")
        self.fmt = fmt
        self.out = Console(width=_width(), highlight=False)  # file=None: sys.stdout at print time
        self.err = Console(stderr=True, highlight=False)

    @property
    def structured(self) -> bool:
        return self.fmt != "table"

    def emit(self, doc: Any, human: Callable[[Console], None] | str | None = None) -> None:
        """The command's result: ``doc`` as json/yaml, else ``human`` (a text, or a function given the console)."""
        if self.fmt == "json":
            sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
        elif self.fmt == "yaml":
            sys.stdout.write(yaml.safe_dump(_plain(doc), sort_keys=False, default_flow_style=False))
        elif callable(human):
            human(self.out)
        else:
            self.out.print(human if human is not None else json.dumps(doc, indent=2, default=str))
        sys.stdout.flush()

    def progress(self, text: str) -> None:
        """A line of progress (a --wait, a streaming rollover) on stderr; markup allowed; never wrapped."""
        self.err.print(text.rstrip(), soft_wrap=True)

    def warn(self, text: str) -> None:
        self.err.print(f"[yellow]warning:[/yellow] {escape(text)}", soft_wrap=True)

    def error(self, text: str) -> None:
        self.err.print(f"[red]recctl:[/red] {escape(text)}", soft_wrap=True)


def _plain(doc: Any) -> Any:
    """json's view of ``doc`` (tuples as lists, Paths as strings) so yaml.safe_dump takes it."""
    return json.loads(json.dumps(doc, default=str))


def add_output_flags(p: argparse.ArgumentParser) -> None:
    """``-o/--output`` and its alias ``--json`` (same dest: the last one given wins)."""
    g = p.add_argument_group("output")
    g.add_argument("-o", "--output", choices=FORMATS, default="table",
                   help="table (default; for people), json or yaml (one document on stdout, nothing else there)")
    g.add_argument("--json", dest="output", action="store_const", const="json", help="same as -o json")


def add_dry_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true",
                   help="print what would be done (in the -o format) and change nothing")


def add_command(sub, name: str, fn, help_: str, changes: bool = False) -> argparse.ArgumentParser:
    """One subcommand as every recctl command is made: ``-o``, ``--dry-run`` when it ``changes`` state, its function."""
    sp = sub.add_parser(name, help=help_, description=help_)
    add_output_flags(sp)
    if changes:
        add_dry_run(sp)
    sp.set_defaults(fn=fn)
    return sp


def dry_run_doc(action: str, **what: Any) -> dict:
    return {"dry_run": True, "action": action, **what}


# ---------------------------------------------------------------------------------------------- parsing
class Parser(argparse.ArgumentParser):
    """argparse with recctl's usage errors: ``recctl rollover: --steps: '10,x' is not ...`` and exit 2."""

    def error(self, message: str):  # noqa: D401 (argparse's signature)
        if message.startswith("argument "):
            message = message[len("argument "):]
            flag, sep, rest = message.partition(": ")
            if sep and "/" in flag:  # "-o/--output: ..." -> "--output: ..."
                flag = flag.split("/")[-1]
            message = f"{flag}{sep}{rest}"
        self.print_usage(sys.stderr)
        self.exit(USAGE, f"{self.prog}: {message}\n")
