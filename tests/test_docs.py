"""The docs cannot rot: every example is run or checked, every relative link resolves, the CLI reference is current.

Convention, on the line just before a fenced block (blank lines between are allowed):

- ``<!-- test -->`` on a ``bash`` or ``python`` block: it runs here, from the repository root, with ``.venv/bin``
  first on PATH, and must exit 0. Only examples that need no fleet, cluster or GPU (they start nothing lasting).
- ``<!-- test: fleet -->`` on a ``bash`` or ``python`` block: it talks to a running fleet (``recctl status``, a
  client on ``localhost:8001``). tests/test_recctl_fleet.py runs it against one real fleet, in page order, with
  ``RECSERVE_ROOT`` naming that fleet and the documented client addresses (``localhost:8001``/``8000``) replaced by
  its ports; here it is also checked as ``not run`` examples are.
- ``<!-- test: drill spec -->`` / ``<!-- test: backup policy -->`` / ``<!-- test: serving spec -->`` on a ``yaml``
  block: it is validated by the loader
  that reads such files (``recserve.drills.spec.load_file`` / ``recserve.control.backup.policy.load_policy``);
  ``<!-- test: retry service config -->`` on a ``json`` block: it equals ``RETRY_SERVICE_CONFIG``.
- ``<!-- not run: why -->``: an example that starts a fleet or servers of its own, needs a cluster, a GPU, Docker,
  a bucket, or minutes. It may not be an example that only needs a running fleet (those are ``test: fleet``:
  ``test_fleet_examples_are_run``). It is still checked: Python
  compiles and its ``recserve`` imports resolve; shell passes ``bash -n``, every ``recctl`` command parses with
  recctl's own parser (file arguments need not exist), every ``make`` target exists, every
  ``python -m recserve...`` module exists and knows the flags given to it, and repository paths exist.

Every ``bash``/``sh``/``python`` block in README.md, docs/, deploy/README.md and drills/README.md must carry one of
these markers.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import glob
import importlib
import importlib.util
import io
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from recserve.control.runtime.triton import REPO_ROOT

DOCS = REPO_ROOT / "docs"
PAGES = [REPO_ROOT / "README.md", REPO_ROOT / "deploy" / "README.md", REPO_ROOT / "drills" / "README.md",
         *sorted(DOCS.glob("*.md"))]
#: Measurement write-ups in docs/ (not guides): their links are checked, their examples need no marker.
REPORTS = {"oversized-requests.md"}
GUIDES = [p for p in PAGES if p.name not in REPORTS or p.parent != DOCS]
CODE_LANGS = {"bash", "sh", "shell", "console", "python", "py"}
#: Top-level folders of the checkout: a shell argument starting with one of these names a committed path.
REPO_DIRS = ("build/", "control/", "deploy/", "docs/", "drills/", "perf/", "tests/", "tools/", "model_repository/",
             "recserve/")
#: ``--help`` of these imports torch (seconds): their flags are not checked.
SLOW_HELP = {"recserve.build.pipeline"}

FENCE = re.compile(r"^(\s*)```\s*([\w+-]*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*(test(?::\s*([\w ]+?))?|not run:\s*(.+?))\s*-->\s*$")


@dataclass(frozen=True)
class Example:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    marker: str | None  # "test", "test: drill spec", "test: fleet", "not run", or None
    code: str
    reason: str = ""  # a ``not run`` example's why

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO_ROOT)}:{self.line}"


def examples(page: Path) -> list[Example]:
    lines = page.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang, start = m.group(1), m.group(2).lower(), i
        body = []
        i += 1
        while i < len(lines) and not re.match(rf"^{re.escape(indent)}```\s*$", lines[i]):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        i += 1
        j = start - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        mk = MARKER.match(lines[j]) if j >= 0 else None
        marker = None
        if mk:
            marker = "not run" if mk.group(3) else ("test: " + mk.group(2).strip() if mk.group(2) else "test")
        out.append(Example(page, start + 1, lang, marker, "\n".join(body) + "\n", mk.group(3) or "" if mk else ""))
    return out


ALL = [e for p in PAGES for e in examples(p)]
RUN = [e for e in ALL if e.marker == "test" and e.lang in CODE_LANGS]
#: run against one real fleet by tests/test_recctl_fleet.py; checked here as the ``not run`` ones are
FLEET = [e for e in ALL if e.marker == "test: fleet" and e.lang in CODE_LANGS]
CHECKED = [e for e in ALL if e.marker in ("not run", "test: fleet") and e.lang in CODE_LANGS]
VALIDATED = [e for e in ALL if e.marker and e.marker.startswith("test: ") and e.marker != "test: fleet"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


# ------------------------------------------------------------------------------------------ the pages themselves
def test_readme_is_short_and_names_every_guide():
    readme = (REPO_ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 300, "README.md is for the first look: move detail into docs/"
    linked = set(re.findall(r"\]\((docs/[^)#]+)", readme))
    missing = [f"docs/{p.name}" for p in sorted(DOCS.glob("*.md")) if f"docs/{p.name}" not in linked]
    assert not missing, f"README.md's table of contents lacks {missing}"


def test_readme_keeps_the_gpu_statement():
    readme = (REPO_ROOT / "README.md").read_text()
    assert "## What has and has not been verified on a GPU" in readme
    assert "untested on a GPU" in readme and "tools/gpu-check" in readme


@pytest.mark.parametrize("page", GUIDES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_no_internal_issue_numbers(page):
    """Readers do not have the tracker: "issue 9" means nothing to them (an upstream link like server#3627 may stay)."""
    hits = [f"{n}: {line.strip()}" for n, line in enumerate(page.read_text().splitlines(), 1)
            if re.search(r"\bissues?\s+#?\d+", line, re.I)]
    assert not hits, hits


def test_every_shell_and_python_example_is_marked():
    unmarked = [e.where for e in ALL if e.lang in CODE_LANGS and e.marker is None
                and not (e.page.parent == DOCS and e.page.name in REPORTS)]
    assert not unmarked, ("mark each example <!-- test --> (it runs here) or <!-- not run: why --> "
                          f"(it is syntax-checked): {unmarked}")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"<[^>]+>", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@cache
def _anchors(page: Path) -> set[str]:
    text = re.sub(r"^\s*```.*?^\s*```", "", page.read_text(), flags=re.S | re.M)
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", text, re.M):
        s = _slug(m.group(1))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    out |= set(re.findall(r'<a\s+(?:id|name)="([^"]+)"', text))
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_relative_links_resolve(page):
    text = re.sub(r"^\s*```.*?^\s*```", "", page.read_text(), flags=re.S | re.M)  # not inside code blocks
    text = re.sub(r"`[^`\n]*`", "", text)  # nor inside inline code
    broken = []
    for target in re.findall(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(REPO_ROOT)}")
    assert not broken, broken


def test_cli_reference_is_current():
    from recserve.control.api.clidoc import CLI_MD, render

    assert CLI_MD.exists() and CLI_MD.read_text() == render(), "docs/cli.md is stale: run `make docs`"


# --------------------------------------------------------------------------------------- examples that run
@pytest.mark.parametrize("ex", RUN, ids=lambda e: e.where)
def test_example_runs(ex):
    if ex.lang in ("python", "py"):
        cmd = [sys.executable, "-c", ex.code]
    else:
        cmd = ["bash", "-e", "-o", "pipefail", "-c", ex.code]
    out = subprocess.run(cmd, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (f"{ex.where} exited {out.returncode}\n{ex.code}\n"
                                 f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}")


@pytest.mark.parametrize("ex", VALIDATED, ids=lambda e: e.where)
def test_example_file_validates(ex, tmp_path):
    kind = ex.marker.removeprefix("test: ")
    if kind == "drill spec":
        from recserve.drills.spec import load_file

        name = re.search(r"^name:\s*([\w-]+)", ex.code, re.M).group(1)  # a spec's name is its file name
        f = tmp_path / f"{name}.yaml"
        f.write_text(ex.code)
        load_file(f)
    elif kind == "backup policy":
        from recserve.control.backup.policy import load_policy

        f = tmp_path / "policy.yaml"
        f.write_text(ex.code)
        load_policy(f)
    elif kind == "serving spec":  # against a generated user repository whose golden files recctl init wrote
        from recserve.control.spec.init import init_spec
        from recserve.control.spec.spec import load_spec
        from tests.byo_repository import make_repository

        make_repository(tmp_path / "repo")
        init_spec(tmp_path / "repo", tmp_path / "init" / "spec.yaml", n_requests=2)
        (tmp_path / "init" / "golden").rename(tmp_path / "golden")
        f = tmp_path / "spec.yaml"
        f.write_text(ex.code)
        load_spec(f)
    elif kind == "retry service config":
        from recserve.control.client import RETRY_SERVICE_CONFIG

        assert json.loads(ex.code) == RETRY_SERVICE_CONFIG, "the page shows another policy than clients use"
    else:
        pytest.fail(f"{ex.where}: unknown marker 'test: {kind}' (known: drill spec, backup policy, "
                    "retry service config, serving spec)")


# ------------------------------------------------------------------------------ examples that are only checked
def _python_problems(code: str) -> list[str]:
    try:
        tree = ast.parse(code)
    except SyntaxError as exc:
        return [f"syntax: {exc}"]
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("recserve", "control"):
            try:
                mod = importlib.import_module(node.module)
            except ImportError as exc:
                problems.append(f"from {node.module} import ...: {exc}")
                continue
            for alias in node.names:
                if not hasattr(mod, alias.name) and not (
                        hasattr(mod, "__path__") and importlib.util.find_spec(f"{node.module}.{alias.name}")):
                    problems.append(f"{node.module} has no {alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in ("recserve", "control"):
                    try:
                        importlib.import_module(alias.name)
                    except ImportError as exc:
                        problems.append(f"import {alias.name}: {exc}")
    return problems


def _relaxed(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """recctl's parser with file and directory arguments that need not exist here (the docs name example files)."""
    from recserve.control.api.cli_output import existing_dir, existing_file

    for action in parser._actions:
        if action.type in (existing_file, existing_dir):
            action.type = str
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _relaxed(sub)
    return parser


@cache
def _recctl_parser() -> argparse.ArgumentParser:
    from recserve.control.api.recctl import build_parser

    return _relaxed(build_parser())


@cache
def _make_targets() -> frozenset[str]:
    text = (REPO_ROOT / "Makefile").read_text()
    return frozenset(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, re.M))


@cache
def _module_help(module: str, words: tuple[str, ...]) -> str:
    out = subprocess.run([sys.executable, "-m", module, *words, "--help"], cwd=REPO_ROOT, env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"python -m {module} {' '.join(words)} --help: {out.stderr[-1000:]}"
    return out.stdout


def _commands(code: str) -> list[list[str]]:
    """Simple commands of a shell snippet: continuation lines joined, split at | && || ; & ( ) and redirections."""
    joined = re.sub(r"\\\n", " ", code)
    cmds = []
    for line in joined.splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        lex.commenters = "#"
        current: list[str] = []
        try:
            tokens = list(lex)
        except ValueError:  # an unbalanced quote: bash -n reports it
            continue
        skip_next = False
        for tok in tokens:
            if skip_next:
                skip_next = False
                continue
            if tok and all(c in "();<>|&" for c in tok):
                if current:
                    cmds.append(current)
                current = []
                skip_next = tok in (">", ">>", "<", ">&", "&>", "2>")  # a redirection's file is no command
                continue
            current.append(tok)
        if current:
            cmds.append(current)
    return cmds


def _shell_problems(code: str) -> list[str]:
    syntax = subprocess.run(["bash", "-n"], input=code, capture_output=True, text=True, timeout=30)
    if syntax.returncode != 0:
        return [f"bash -n: {syntax.stderr.strip()}"]
    problems = []
    for words in _commands(code):
        while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):  # VAR=value prefixes
            words = words[1:]
        if not words:
            continue
        cmd, args = words[0], words[1:]
        name = Path(cmd).name
        if name == "recctl":
            err = io.StringIO()
            try:
                with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                    _recctl_parser().parse_args(args)
            except SystemExit as exc:
                if exc.code not in (0, None):
                    problems.append(f"recctl {' '.join(args)}: {err.getvalue().strip().splitlines()[-1]}")
        elif name == "make":
            for a in args:
                if not a.startswith("-") and "=" not in a and a not in _make_targets():
                    problems.append(f"make {a}: no such target in the Makefile")
        elif re.fullmatch(r"python3?(\.\d+)?", name):
            if args[:1] == ["-m"] and len(args) > 1:
                module, rest = args[1], args[2:]
                if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
                    problems.append(f"python -m {module}: no such module")
                elif module.startswith("recserve.") and module not in SLOW_HELP:
                    sub = []
                    for w in rest:  # leading sub-command words, e.g. `run crash`
                        if not re.fullmatch(r"[a-z][a-z0-9-]*", w):
                            break
                        sub.append(w)
                    text = _module_help(module, tuple(sub))
                    for flag in (w.split("=")[0] for w in rest if w.startswith("--")):
                        if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text):
                            problems.append(f"python -m {module} {' '.join(sub)}: no flag {flag}")
            elif args[:1] == ["-c"] and len(args) > 1:
                problems += [f"python -c: {p}" for p in _python_problems(args[1])]
        for w in words:
            path = w.split("=", 1)[-1].removeprefix("./")  # --file=deploy/... too
            if not path.startswith(REPO_DIRS):
                continue
            if any(c in path for c in "*?["):
                if not glob.glob(str(REPO_ROOT / path)):
                    problems.append(f"{path}: matches nothing")
            elif not (REPO_ROOT / path.split("::")[0]).exists():
                problems.append(f"{path}: no such file")
    return problems


@pytest.mark.parametrize("ex", CHECKED, ids=lambda e: e.where)
def test_example_that_is_not_run_is_well_formed(ex):
    problems = _python_problems(ex.code) if ex.lang in ("python", "py") else _shell_problems(ex.code)
    assert not problems, f"{ex.where}:\n" + "\n".join(problems)


def test_the_checks_catch_what_they_should():
    """The checker itself: a wrong import, an unknown recctl flag, a missing target and module, a wrong path."""
    assert _python_problems("from control.client import RecClient")  # the import deploy/README.md once showed
    assert _python_problems("from recserve.control.client import NoSuchThing")
    assert not _python_problems("from recserve.control.client import RecClient")
    assert _shell_problems("recctl rollover ranker --verison 2")
    assert _shell_problems("recctl rollover ranker --steps 10,x --version 2")
    assert not _shell_problems("recctl up --tls-cert server.crt --tls-key server.key  # files need not exist")
    assert _shell_problems("make no-such-target")
    assert _shell_problems("python -m recserve.control.no_such_module")
    assert _shell_problems("python -m recserve.drills run crash --no-such-flag")
    assert not _shell_problems("python -m recserve.drills run crash --private")
    assert _shell_problems("kubectl apply -k deploy/k8s/overlays/no-such-overlay")
    assert _shell_problems("python -c 'from control.client import RecClient'")


# ------------------------------------------------------------------------ examples a running fleet can run
#: recctl commands that only talk to a running fleet (nothing started or stopped, no cluster, no target).
FLEET_COMMANDS = {"status", "versions", "rollover", "rollback", "rollout", "limits", "snapshot", "snapshots", "restore",
                  "backup"}
#: Commands that may sit next to them in such an example without starting anything.
BYSTANDERS = {"curl", "jq", "echo", "cat", "head", "tail", "grep", "python", "python3", "open", "xdg-open"}
#: A client dialling the fleet's documented front door.
CLIENT = re.compile(r"localhost:800[01]")


def _fleet_only_recctl(args: list[str]) -> bool:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            ns = _recctl_parser().parse_args(args)
    except SystemExit:
        return False
    return (ns.command in FLEET_COMMANDS and not getattr(ns, "source", None) and not getattr(ns, "check", None))


def needs_only_a_fleet(ex: Example) -> bool:
    """An example a running fleet can run as it is: a client on the front door (not through a cluster's
    port-forward), or recctl commands against the fleet with nothing that starts, stops or rewrites anything."""
    if ex.lang in ("python", "py"):
        return bool(CLIENT.search(ex.code)) and "cluster" not in ex.reason
    fleet = False
    for words in _commands(ex.code):
        while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
            words = words[1:]
        if not words:
            continue
        name = Path(words[0]).name
        if name == "recctl" and _fleet_only_recctl(words[1:]):
            fleet = True
        elif name == "curl" and any(CLIENT.search(w) for w in words):
            fleet = True
        elif name not in BYSTANDERS or (re.fullmatch(r"python3?", name) and words[1:2] == ["-m"]
                                        and words[2:3] != ["recserve.control.api.statushtml"]):
            return False
    return fleet and "cluster" not in ex.reason


def test_fleet_examples_are_run():
    """What a running fleet can run is run (``test: fleet``): ``not run`` is for examples that start their own
    fleet or servers, need a cluster, a GPU, Docker, a bucket, or minutes, and says which."""
    left = [f"{e.where} (not run: {e.reason})" for e in ALL if e.marker == "not run" and e.lang in CODE_LANGS
            and needs_only_a_fleet(e)]
    assert not left, f"mark these <!-- test: fleet --> (tests/test_recctl_fleet.py runs them against a fleet): {left}"
    assert FLEET, "no example is run against a fleet"


def test_the_fleet_rule_tells_what_a_fleet_can_run():
    def ex(code: str, lang: str = "bash", reason: str = "needs a fleet") -> Example:
        return Example(DOCS / "x.md", 1, lang, "not run", code, reason)

    assert needs_only_a_fleet(ex("recctl status\nrecctl rollover ranker --version 2 --bake 5"))
    assert needs_only_a_fleet(ex("recctl status -o json | jq .health"))
    assert needs_only_a_fleet(ex("curl -s localhost:8000/v2/models/recommend/infer -d '{}'"))
    assert needs_only_a_fleet(ex('from x import y\nRecClient("localhost:8001")', "python"))
    assert not needs_only_a_fleet(ex("make fleet-up\nrecctl status"))
    assert not needs_only_a_fleet(ex("recctl up --dry-run\nrecctl status"))
    assert not needs_only_a_fleet(ex("recctl backup list --from /var/backups/recserve"))
    assert not needs_only_a_fleet(ex("recctl k8s status"))
    assert not needs_only_a_fleet(ex("python -m recserve.drills run crash\nrecctl status"))
    assert not needs_only_a_fleet(ex('RecClient("localhost:8001")', "python", "needs a cluster (port-forward)"))
