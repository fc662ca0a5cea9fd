"""The installed import names are unambiguous: one package, recserve, whose subpackages are the top-level folders.

(PyPA's build making the sdist and wheel from the root is checked by hand, see the README's Layout section:
it needs a network for its isolated build environment.)"""

from __future__ import annotations

import subprocess
import sys
import tomllib

from recserve.control.runtime.triton import REPO_ROOT

FOLDERS = ("build", "control", "perf", "drills")


def test_wheel_holds_only_the_recserve_package():
    cfg = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert all(p == "recserve" or p.startswith("recserve.") for p in cfg["packages"]), cfg["packages"]
    assert cfg["package-dir"] == {f"recserve.{f}": f for f in FOLDERS}
    # setuptools' sdist prunes its build_base, "build" by default: that would drop our build/ folder
    assert tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["distutils"]["build"]["build-base"] \
        != "build"


def test_build_folder_does_not_shadow_pypa_build():
    """A build/__init__.py at the root would win over PyPA's build for `python -m build` run there."""
    assert not (REPO_ROOT / "build" / "__init__.py").exists()


def test_folders_import_only_under_recserve():
    code = ("import importlib, recserve.control, recserve.perf, recserve.drills, recserve.build.manifest\n"
            "for name in ('control', 'perf', 'drills'):\n"
            "    try:\n"
            "        importlib.import_module(name)\n"
            "    except ImportError as exc:\n"
            "        print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for name in ("control", "perf", "drills"):
        assert f"import recserve.{name}, not {name}" in out.stdout, out.stdout
