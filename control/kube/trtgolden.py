"""Golden checks of the TensorRT ensembles (``recommend_trt``, ``search_trt``) that GPU pods serve.

The deep check (control/fleet/health.py) asks ``recommend`` and ``search`` only; a pod of the gpu overlay also
serves their ``*_trt`` twins, whose engines could be wrong while the ONNX path answers right. Expected answers come
from the same in-process reference (``build.reference`` on onnxruntime), run on the ONNX versions each served
engine was built from (its manifest's ``source_onnx_sha256``), never from a pod. An engine is allowed TensorRT's
numeric drift (FP16): the check compares the top-10 items, not the scores, and needs ``MIN_OVERLAP`` of them
(the build accepts an engine at a mean top-10 overlap of 0.99 over a batch; one request here is allowed one item).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from recserve.control.client import RecClient
from recserve.control.fleet.golden import Golden
from recserve.control.fleet.health import INFER_TIMEOUT_S, Probe

SUFFIX = "_trt"
#: Top-10 items of a TensorRT answer that must be among the reference's top 10.
MIN_OVERLAP = 0.9
TOP = 10


def trt_models(models: list[str]) -> list[str]:
    """The TensorRT ensembles among a fleet's top-level models."""
    return [m for m in models if m.endswith(SUFFIX) and m[: -len(SUFFIX)] in ("recommend", "search")]


def _onnx_sha(version_dir: Path) -> str | None:
    try:
        return json.loads((version_dir / "manifest.json").read_text())["files"]["model.onnx"]
    except (OSError, ValueError, KeyError):
        return None


def source_versions(repository: Path, versions: dict[str, list[int]]) -> dict[str, int]:
    """ONNX model -> the version each served ``<model>_trt`` engine was built from; ValueError naming what is
    missing when an engine's source cannot be found in the repository."""
    out: dict[str, int] = {}
    for model, served in versions.items():
        if not model.endswith(SUFFIX) or not served:
            continue
        base = model[: -len(SUFFIX)]
        vdir = Path(repository) / model / str(max(served))
        try:
            sha = json.loads((vdir / "manifest.json").read_text())["source_onnx_sha256"]
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"{vdir}: no source_onnx_sha256 in its manifest ({type(exc).__name__})") from None
        found = [int(d.name) for d in (Path(repository) / base).iterdir() if d.name.isdigit() and _onnx_sha(d) == sha]
        if not found:
            raise ValueError(f"{model} {max(served)} was built from an ONNX {base} that is not in the repository "
                             f"(sha256 {sha[:12]}...)")
        out[base] = max(found)
    return out


class TrtGolden:
    """Golden checks of the ``*_trt`` ensembles on one pod; expectations cached per version set by ``golden``."""

    def __init__(self, repository: Path, golden: Golden):
        self.repository = Path(repository)
        self.golden = golden
        self._clients: dict[str, tuple[str, RecClient]] = {}

    def client(self, iid: str, url: str) -> RecClient:
        cached = self._clients.get(iid)
        if cached is None or cached[0] != url:
            cached = (url, RecClient(url, timeout_s=INFER_TIMEOUT_S, model_suffix=SUFFIX, retry_policy=None))
            self._clients[iid] = cached
        return cached[1]

    def check(self, iid: str, url: str, versions: dict[str, list[int]], models: list[str]) -> Probe:
        t0 = time.time()

        def fail(reason: str) -> Probe:
            return Probe(False, "golden", reason, t0, time.time() - t0)

        wanted = [m[: -len(SUFFIX)] for m in trt_models(models)]
        if not wanted:
            return Probe(True, "ok", "", t0)
        try:
            sources = source_versions(self.repository, versions)
        except ValueError as exc:
            return fail(f"TensorRT: {exc}")
        ref_versions = {m: ([sources[m]] if m in sources else v) for m, v in versions.items()
                        if not m.endswith(SUFFIX)}
        exp = self.golden.expected(ref_versions)
        if exp is None:
            return fail(f"TensorRT: no expected answers: {self.golden.problem(ref_versions)}")
        try:
            got = self.golden.ask(self.client(iid, url), self.golden.requests)
        except Exception as exc:  # tritonclient raises its own exception types
            return fail(f"TensorRT golden inference failed: {str(exc)[:200]}")
        for base in wanted:
            want, have = exp.answers[base].item_ids[:TOP], got[base].item_ids[:TOP]
            share = len(set(want) & set(have)) / max(1, len(want))
            if share < MIN_OVERLAP:
                return fail(f"{base}{SUFFIX}: top-{TOP} overlap {share:.2f} with the reference < {MIN_OVERLAP} "
                            f"(items {list(have)[:5]}... vs {list(want)[:5]}...)")
        return Probe(True, "ok", "", t0, time.time() - t0)
