"""recserve: the one import package; its subpackages are the repository's top-level folders.

``recserve.build``, ``recserve.control``, ``recserve.perf`` and ``recserve.drills`` are the folders build/,
control/, perf/ and drills/. In a wheel, pyproject's package-dir puts them under recserve/. In a checkout
they stay at the root (the layout the README promises) and the root is added to this package's search
path below, so the same imports work in both and nothing of recserve is importable as a top-level
``build``/``control``/``perf``/``drills``. build/ has no __init__.py (a namespace portion), so with the
repository root first on sys.path PyPA's ``build`` package still wins: ``python -m build`` works there.
"""

from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if (_ROOT / "pyproject.toml").is_file() and (_ROOT / "control" / "api" / "server.py").is_file():  # a checkout
    __path__.append(str(_ROOT))
