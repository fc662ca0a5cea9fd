"""In-process reference of the served ensembles: numpy + onnxruntime on explicit model versions, no torch.

Why: the control plane's golden checks, the rollout gates and the quality tests need the exact answer the
Triton ensembles should give, computed without asking an instance. Each step is the served one itself:
the Python steps are the very numpy modules the served ``model.py`` files import (loaded from the model
repository: ``recommend_pre/<v>/shaping.py``, ``recommend_post/<v>/ranking.py``, ``search_pre/<v>/tokenizer.py``)
and the ONNX steps run the served ``model.onnx`` files, so a difference between this and a server is a
serving bug. The control plane imports this module: it must never import torch (tests/test_golden.py runs it
with torch made unimportable).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

import numpy as np
import onnxruntime as ort

from recserve.build.manifest import numeric_versions

#: The ONNX models of the ensembles (``<model>/<v>/model.onnx``).
ONNX_MODELS = ("retrieval", "ranker", "search_model")
#: The Python steps of the ensembles and the numpy module beside each ``model.py`` that holds its logic.
PYTHON_STEPS = {"recommend_pre": "shaping.py", "recommend_post": "ranking.py", "search_pre": "tokenizer.py"}
MODELS = ONNX_MODELS + tuple(PYTHON_STEPS)


def ort_session(path: str | Path, threads: int = 2) -> ort.InferenceSession:
    """CPU onnxruntime session; no spinning threads (shared 2-core hosts)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def served_module(path: str | Path) -> ModuleType:
    """Import a numpy module of the model repository by its path (the served file itself, not a copy)."""
    path = Path(path)
    name = "recserve_repo_" + "_".join(path.parts[-3:]).replace(".py", "").replace("-", "_")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def latest_version_dir(repository: str | Path, model: str) -> Path:
    """Highest numeric version dir of ``model`` (FileNotFoundError when there is none)."""
    versions = numeric_versions(Path(repository) / model)
    if not versions:
        raise FileNotFoundError(f"no numeric version of {model!r} under {repository}")
    return Path(repository) / model / str(versions[-1])


def latest_versions(repository: str | Path, models: tuple[str, ...] = MODELS) -> dict[str, int]:
    """Latest version number of each model."""
    return {m: int(latest_version_dir(repository, m).name) for m in models}


class Reference:
    """recommend() and search() exactly as the served ensembles compute them (batch of one), on ``versions``."""

    def __init__(self, repository: str | Path, versions: Mapping[str, int], threads: int = 1) -> None:
        """``versions``: the version of every model in ``MODELS`` (ValueError names the missing ones);
        FileNotFoundError when a version's file is absent."""
        missing = [m for m in MODELS if m not in versions]
        if missing:
            raise ValueError(f"Reference needs an explicit version of {missing} (got {dict(versions)})")
        self.repository = Path(repository)
        self.versions = {m: int(versions[m]) for m in MODELS}
        dirs = {m: self.repository / m / str(v) for m, v in self.versions.items()}
        for m in ONNX_MODELS:
            if not (dirs[m] / "model.onnx").is_file():
                raise FileNotFoundError(f"{dirs[m] / 'model.onnx'} does not exist")
        self.sessions = {m: ort_session(dirs[m] / "model.onnx", threads) for m in ONNX_MODELS}
        steps = {m: served_module(dirs[m] / f) for m, f in PYTHON_STEPS.items()}
        self.shaping, self.ranking = steps["recommend_pre"], steps["recommend_post"]
        self.tokenizer = steps["search_pre"]

    @classmethod
    def latest(cls, repository: str | Path, threads: int = 1) -> Reference:
        """The reference on the latest version of every model (what Triton serves by default)."""
        return cls(repository, latest_versions(repository), threads)

    def recommend(self, user_id: int, history: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Top-20 (item_ids, ranker scores): retrieval top-100 with the history excluded, re-ranked.
        ValueError (from recommend_pre's rules) for a request the server refuses."""
        users = np.array([[user_id]], dtype=np.int64)
        hist = np.asarray(list(history), dtype=np.int64).reshape(1, -1)
        user_idx, history50, exclude = self.shaping.prepare(users, hist)
        cand_ids, _ = self.sessions["retrieval"].run(
            None, {"user_id": user_idx, "history": history50, "exclude": exclude}
        )
        (scores,) = self.sessions["ranker"].run(None, {"history": history50, "candidates": cand_ids})
        ids, top = self.ranking.top_n(cand_ids, scores)
        return ids[0], top[0]

    def search(self, query: str, user_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-20 (item_ids, scores) for a query; ``user_id`` None = anonymous. ValueError (from search_pre's
        rules) for a request the server refuses."""
        tokens, users = self.tokenizer.search_inputs([query.encode("utf-8")], None if user_id is None else [user_id])
        ids, scores = self.sessions["search_model"].run(
            None, {"tokens": np.asarray(tokens, dtype=np.int64), "user_id": np.asarray(users, dtype=np.int64)}
        )
        return ids[0].astype(np.int64), scores[0].astype(np.float32)


def record_expectations(golden: dict, ref: Reference) -> dict:
    """The reference's answers to every request of a golden.json document, for the control plane's fallback
    when the reference cannot run (``expected``: versions, then answers in the order of the requests)."""
    def pack(ids: np.ndarray, scores: np.ndarray) -> dict:
        return {"item_ids": [int(i) for i in ids], "scores": [float(s) for s in scores]}

    return {
        "versions": dict(ref.versions),
        "recommend": [pack(*ref.recommend(int(e["user_id"]), e.get("history", []))) for e in golden["recommend"]],
        "search": [pack(*ref.search(str(e["query"]), e.get("user_id"))) for e in golden["search"]],
    }


def main(argv: list[str] | None = None) -> int:
    """Record the reference's answers in an existing golden.json (the build does this itself)."""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m recserve.build.reference", description=main.__doc__)
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--golden", type=Path, default=Path("artifacts/golden.json"), help="the build's golden requests")
    args = p.parse_args(argv)
    doc = json.loads(args.golden.read_text())
    ref = Reference.latest(args.repository)
    doc["expected"] = record_expectations(doc, ref)
    args.golden.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"recorded expected answers of versions {ref.versions} in {args.golden}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
