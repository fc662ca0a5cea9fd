"""ONNX export of the serving graphs and torch-vs-onnxruntime parity.

Why the legacy exporter (dynamo=False), opset 17 and only the batch axis dynamic: those graphs load in
the Triton ONNX Runtime backend and parse in TensorRT 10.5 as they are. Parity is checked on held-out
requests plus edge cases (unknown ids, empty histories) so a model that drifts in export never ships.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from recserve.build.reference import ort_session  # one session recipe, shared with the torch-free reference

OPSET = 17
PARITY_ATOL = 1e-4

#: The serving contract of each model: (input names, output names, topk output or None).
CONTRACTS: dict[str, tuple[tuple[str, ...], tuple[str, ...], str | None]] = {
    "retrieval": (("user_id", "history", "exclude"), ("cand_ids", "cand_scores"), "cand_ids"),
    "ranker": (("history", "candidates"), ("scores",), None),
    "search_model": (("tokens", "user_id"), ("item_ids", "scores"), "item_ids"),
}

_TRITON_DTYPE = {
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
}


def export_onnx(graph: nn.Module, name: str, example: tuple[torch.Tensor, ...], path: Path) -> Path:
    """Export ``graph`` with the contract of ``name``; only axis 0 ("batch") is dynamic; onnx.checker'd."""
    inputs, outputs, _ = CONTRACTS[name]
    path.parent.mkdir(parents=True, exist_ok=True)
    graph.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about python ints: shapes are constant by design
        torch.onnx.export(
            graph,
            example,
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=list(inputs),
            output_names=list(outputs),
            dynamic_axes={n: {0: "batch"} for n in inputs + outputs},
            do_constant_folding=True,
        )
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    return path


def contract(path: Path) -> dict[str, list[dict]]:
    """Names, Triton dtypes and shapes (-1 = batch) of the graph's inputs and outputs."""
    model = onnx.load(str(path), load_external_data=False)
    inferred = onnx.shape_inference.infer_shapes(model)

    def describe(values: list) -> list[dict]:
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
            out.append({"name": v.name, "data_type": _TRITON_DTYPE.get(t.elem_type, str(t.elem_type)), "dims": dims})
        return out

    return {"inputs": describe(inferred.graph.input), "outputs": describe(inferred.graph.output)}


def run_ort(sess: ort.InferenceSession, feeds: dict[str, np.ndarray], batch: int = 64) -> list[np.ndarray]:
    """Run in chunks of ``batch`` rows (the served max_batch_size)."""
    n = len(next(iter(feeds.values())))
    parts = [sess.run(None, {k: v[s : s + batch] for k, v in feeds.items()}) for s in range(0, n, batch)]
    return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]


def _max_abs_diff(a: np.ndarray, b: np.ndarray) -> tuple[float, bool]:
    """Max |a - b| over finite entries, and whether the infinite entries agree exactly."""
    fin = np.isfinite(a) & np.isfinite(b)
    inf_ok = bool(np.array_equal(~np.isfinite(a), ~np.isfinite(b)) and np.array_equal(a[~fin], b[~fin]))
    return (float(np.abs(a[fin] - b[fin]).max()) if fin.any() else 0.0), inf_ok


@dataclass
class Parity:
    name: str
    n_requests: int
    max_abs_diff: float
    topk_ids_identical: bool | None
    infinities_match: bool

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= PARITY_ATOL and self.infinities_match and self.topk_ids_identical is not False

    def as_dict(self) -> dict:
        return {
            "n_requests": self.n_requests,
            "max_abs_diff": self.max_abs_diff,
            "tolerance": PARITY_ATOL,
            "topk_ids_identical": self.topk_ids_identical,
            "infinities_match": self.infinities_match,
            "passed": self.passed,
            "runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider",
        }


def parity(graph: nn.Module, name: str, path: Path, feeds: dict[str, np.ndarray]) -> Parity:
    """torch graph vs onnxruntime on the same inputs: scores within PARITY_ATOL, top-K ids identical."""
    inputs, outputs, topk = CONTRACTS[name]
    with torch.no_grad():
        ref = graph(*(torch.from_numpy(feeds[k]) for k in inputs))
    ref = [r.numpy() for r in (ref if isinstance(ref, tuple) else (ref,))]
    got = run_ort(ort_session(path), feeds)
    diff, inf_ok, ids_ok = 0.0, True, None
    for out_name, r, g in zip(outputs, ref, got, strict=True):
        if out_name == topk:
            ids_ok = bool(np.array_equal(r, g))
        else:
            d, ok = _max_abs_diff(r.astype(np.float64), g.astype(np.float64))
            diff, inf_ok = max(diff, d), inf_ok and ok
    return Parity(name, len(next(iter(feeds.values()))), diff, ids_ok, inf_ok)
