"""Layering of recserve's packages, read from the source with ``ast`` (nothing is imported).

Why: the drills test the fleet, so they must talk to it the way a client does; the control plane must run
without the drills and perf installed around it; and an import cycle makes what loads first decide what
works. These rules held by habit until control/ was reorganised; now ``violations()`` states them:

1. recserve.control imports nothing from recserve.drills or recserve.perf, except perf's published reader of
   its report (``CONTROL_MAY_USE``), which itself imports nothing from perf or drills.
2. recserve.drills and recserve.perf import from recserve.control only ``CLIENT_SURFACE``: the client API and
   shared helpers, never a module that owns fleet state (``STATE_OWNERS``).
3. No cycle of module-level imports between recserve modules, and none between control's subpackages
   (every import counted, including those inside functions: a lazy import hides a cycle, it does not remove it).
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: Import package -> its folder in the checkout (recserve/__init__.py maps them the same way).
PACKAGES = {"recserve.control": "control", "recserve.drills": "drills", "recserve.perf": "perf",
            "recserve.build": "build"}

#: What recserve.control may import from perf or drills, and why.
CONTROL_MAY_USE = {
    "recserve.perf.report_reader": "the knee (capacity_rps) the latest perf run measured; a leaf module",
}

#: What recserve.drills and recserve.perf may import from recserve.control, and why. A module is allowed
#: with its submodules (``x.proto`` covers ``x.proto.control_pb2``).
CLIENT_SURFACE = {
    "recserve.control.defaults": "every default once (REPO_ROOT, DEFAULT_ROOT, the SLO); imports nothing",
    "recserve.control.client": "the inference client (RecClient, degraded-answer check, channel options)",
    "recserve.control.api.proto": "the control plane's gRPC API (generated stubs and messages)",
    "recserve.control.api.tls": "the TLS channel to that API (control_channel)",
    "recserve.control.stats": "shared percentile, so drill, perf and rollout figures agree",
    "recserve.control.reportdir": "shared report-directory helpers (link_latest)",
    "recserve.control.htmlpage": "shared HTML report helpers",
    "recserve.control.testswitch": "the fault-injection switches a drill sets in the environment",
    "recserve.control.routing.haproxy": "the OVERLOADED marker; perf runs its own HAProxy target with it",
    "recserve.control.routing.frontdoor": "front-door limits (GRPC_MAX_BODY) and perf's HAProxy target's config",
    "recserve.control.routing.accesslog": "the access-log line format (parsing what HAProxy wrote)",
    "recserve.control.runtime.triton": "process helpers: REPO_ROOT, free ports, a standalone Triton, shm names",
    "recserve.control.runtime.procs": "process helpers (pid_alive, port_listening)",
    "recserve.control.runtime.process": "process helper: ManagedProcess starts the drills' control plane",
    "recserve.control.runtime.promstack": "process helpers of the monitoring stack (MonitorError)",
    "recserve.control.monitoring.stack": "starts Prometheus/Alertmanager beside a drill's fleet",
    "recserve.control.monitoring.config": "the alert rules' names a drill expects to fire",
    "recserve.control.monitoring.promtext": "parsing Prometheus text from /metrics",
    "recserve.control.fleet.golden": "the golden requests and their reference answers",
    "recserve.control.fleet.spec_golden": "the golden requests of a serving spec and their reference answers",
    "recserve.control.spec": "the serving spec (read-only description of the user's models) and its reference",
    "recserve.control.state.snapshots": "the model-version manifest format (MANIFEST, write_manifest) only",
}

#: Modules that own fleet state: only the control plane itself may import them.
STATE_OWNERS = ("recserve.control.fleet.fleet", "recserve.control.fleet.instances",
                "recserve.control.fleet.membership", "recserve.control.fleet.supervision",
                "recserve.control.routing.router", "recserve.control.state.store",
                "recserve.control.rollout.manager", "recserve.control.api.server")


#: The control API's contract: the generated gRPC messages and stubs, and the one mapping of error codes to
#: gRPC statuses.
API_CONTRACT = ("recserve.control.api.proto", "recserve.control.api.errors")
#: Cycles between control's subpackages that exist and are accepted for now, and why (``violations`` also
#: reports one that no longer exists, so the list cannot go stale).
KNOWN_PACKAGE_CYCLES = {
    ("api", "kube"): "recctl (api.recctl) mounts the `recctl k8s` commands of kube.ctl, which print with "
                     "recctl's own helpers (api.cli_output); moving cli_output out of api/ would end it",
}


def read_tree(root: Path = ROOT) -> dict[str, str]:
    """Every module's source, by path relative to ``root`` (``control/routing/router.py``)."""
    return {p.relative_to(root).as_posix(): p.read_text() for folder in PACKAGES.values()
            for p in sorted((root / folder).rglob("*.py")) if "__pycache__" not in p.parts}


def module_name(path: str) -> str:
    folder, _, rest = path.partition("/")
    pkg = next(k for k, v in PACKAGES.items() if v == folder)
    parts = rest.removesuffix(".py").split("/")
    return ".".join([pkg, *(parts[:-1] if parts[-1] == "__init__" else parts)])


def imports(path: str, source: str, modules: set[str]) -> list[tuple[str, int, bool]]:
    """(imported recserve module, line, at module level) for every import in ``source``; ``from a import b``
    names the module a.b when that is a module, else a."""
    name = module_name(path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, top) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: from .x import y
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for a in child.names:
                    sub = f"{base}.{a.name}"
                    found.append((sub if sub in modules else base, child.lineno, top))
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                visit(child, False)
            elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                visit(child, False)  # never runs: a type annotation's import, not a load-time one
            else:
                visit(child, top)  # module level also inside if/try/with and class bodies

    visit(_parse(path, source), True)
    return [(m, line, top) for m, line, top in found if m.startswith("recserve.")]


@functools.cache
def _parse(path: str, source: str) -> ast.Module:
    return ast.parse(source, filename=path)  # once per source text: the planted tests change one file


def _under(module: str, prefixes) -> str | None:
    return next((p for p in prefixes if module == p or module.startswith(p + ".")), None)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node, or with a self-loop (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def violations(files: dict[str, str]) -> list[str]:
    """Every broken layering rule in ``files`` (path -> source, as ``read_tree`` gives), one line each."""
    modules = {module_name(p) for p in files}
    found: list[str] = []
    load_time: dict[str, set[str]] = {m: set() for m in modules}
    control_pkgs: dict[str, set[str]] = {}
    for path, source in sorted(files.items()):
        src = module_name(path)
        for dst, line, top in imports(path, source, modules):
            where = f"{path}:{line}: {src} imports {dst}"
            if _under(src, ["recserve.control"]) and _under(dst, ["recserve.drills", "recserve.perf"]) \
                    and not _under(dst, CONTROL_MAY_USE):
                found.append(f"{where}: the control plane must not depend on drills or perf")
            if _under(src, CONTROL_MAY_USE) and _under(dst, ["recserve.drills", "recserve.perf"]):
                found.append(f"{where}: a module the control plane may use must not pull in drills or perf")
            if _under(src, ["recserve.drills", "recserve.perf"]) and _under(dst, ["recserve.control"]) \
                    and not _under(dst, CLIENT_SURFACE):
                found.append(f"{where}: drills and perf use the fleet through its client API only "
                             f"(CLIENT_SURFACE)")
            if top and dst in modules and dst != src:
                load_time[src].add(dst)
            a, b = _subpackage(src), _subpackage(dst)
            if a and b and a != b:
                control_pkgs.setdefault(a, set()).add(b)
    found += [f"import cycle at load time: {' <-> '.join(c)}" for c in _cycles(load_time)]
    pkg_cycles = [tuple(c) for c in _cycles(control_pkgs)]
    found += [f"cycle between control's subpackages: {' <-> '.join(c)}" for c in pkg_cycles
              if c not in KNOWN_PACKAGE_CYCLES]
    found += [f"KNOWN_PACKAGE_CYCLES lists {' <-> '.join(c)}, which is no cycle any more: drop it"
              for c in KNOWN_PACKAGE_CYCLES if c not in pkg_cycles]
    return found


def _subpackage(module: str) -> str | None:
    """control's subpackage (or shared module) of ``module``. The API's contract counts on its own, a layer
    under api/'s server and recctl: servicers in other subpackages (backup.api) implement it."""
    if _under(module, API_CONTRACT):
        return "api.contract"
    parts = module.split(".")
    return parts[2] if parts[:2] == ["recserve", "control"] and len(parts) > 2 else None


def test_the_layering_holds():
    assert _checkout()[1] == []


def test_the_client_surface_has_no_state_owner():
    assert not [m for m in STATE_OWNERS if _under(m, CLIENT_SURFACE)]


@functools.cache
def _checkout() -> tuple[dict[str, str], list[str]]:
    files = read_tree()
    return files, violations(files)


def planted(plants: dict[str, str]) -> list[str]:
    """The violations that ``plants`` (path -> lines put on top of that module's source, in memory) add."""
    files, before = _checkout()
    files = dict(files)
    for path, lines in plants.items():
        files[path] = lines + files[path]
    return [v for v in violations(files) if v not in before]


@pytest.mark.parametrize("lines, expected", [
    ("from recserve.drills import runner\n", ["control/stats.py:1: recserve.control.stats imports "
                                              "recserve.drills.runner: the control plane must not depend on "
                                              "drills or perf",
                                              # the runner loads stats again, through the drills' timeline
                                              "import cycle at load time: recserve.control.stats <-> "
                                              "recserve.drills.breakdown <-> recserve.drills.runner <-> "
                                              "recserve.drills.timeline"]),
    ("def f():\n    import recserve.perf.report\n", ["control/stats.py:2: recserve.control.stats imports "
                                                     "recserve.perf.report: the control plane must not depend on "
                                                     "drills or perf"]),
    ("from recserve.perf.report_reader import capacity_rps\n", []),  # the published reader
])
def test_a_planted_control_import_of_drills_or_perf_is_reported(lines, expected):
    assert planted({"control/stats.py": lines}) == expected


def test_a_planted_drill_import_of_fleet_state_and_a_cycle_are_reported():
    found = planted({"drills/timeline.py": "from recserve.control.state import store\n",
                     "perf/report_reader.py": "from recserve.perf import runner\n",
                     "control/client.py": "from recserve.control.fleet.golden import Golden\n"})
    assert found == [
        "drills/timeline.py:1: recserve.drills.timeline imports recserve.control.state.store: drills and perf use "
        "the fleet through its client API only (CLIENT_SURFACE)",
        "perf/report_reader.py:1: recserve.perf.report_reader imports recserve.perf.runner: a module the control "
        "plane may use must not pull in drills or perf",
        "import cycle at load time: recserve.perf.report <-> recserve.perf.report_reader <-> recserve.perf.runner",
        "import cycle at load time: recserve.control.client <-> recserve.control.fleet.golden",
        "cycle between control's subpackages: client <-> fleet",
    ]
