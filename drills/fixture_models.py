"""Small synthetic ONNX models with the exact serving interfaces of retrieval, ranker and search_model.

Why: drills exercise the serving system (processes, routing, versions), not model quality, and they must
be runnable - and tested - on a fresh checkout before the training build has produced real models. These
untrained, deterministic graphs (random embeddings with a fixed seed, Gather + MatMul + TopK) load in
the same Triton configs, with manifests, so the control plane treats them like built versions. The
smoke-drill test uses them only when ``make models`` has not run; reports then say so.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

N_ITEMS = 2000
DIM = 8


def _graph(name: str, seed: int):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((N_ITEMS + 1, DIM)).astype(np.float32)
    inits = [numpy_helper.from_array(emb, "E"), numpy_helper.from_array(emb[1:].T.copy(), "ItemsT"),
             numpy_helper.from_array(np.array([N_ITEMS + 1], dtype=np.int64), "N1"),
             numpy_helper.from_array(np.array([1], dtype=np.int64), "one"),
             numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1")]
    nodes, B = [], "B"

    def user_vec(seq: str) -> str:  # mean of the embeddings of ids (mod N+1: any id is safe)
        nodes.extend([helper.make_node("Mod", [seq, "N1"], [seq + "_m"]),
                      helper.make_node("Gather", ["E", seq + "_m"], [seq + "_e"]),
                      helper.make_node("ReduceMean", [seq + "_e", "axis1"], [seq + "_v"], keepdims=0)])
        return seq + "_v"

    def topk(scores: str, k: int, ids: str, vals: str) -> None:
        inits.append(numpy_helper.from_array(np.array([k], dtype=np.int64), f"k{k}"))
        nodes.extend([helper.make_node("TopK", [scores, f"k{k}"], [vals, ids + "_0"], axis=1),
                      helper.make_node("Add", [ids + "_0", "one"], [ids])])  # item 0 is padding

    if name == "retrieval":
        inputs = [("user_id", [B, 1]), ("history", [B, 50]), ("exclude", [B, 1000])]
        nodes.append(helper.make_node("Concat", ["user_id", "history"], ["uh"], axis=1))
        nodes.append(helper.make_node("MatMul", [user_vec("uh"), "ItemsT"], ["s"]))
        topk("s", 100, "cand_ids", "cand_scores")
        outputs = [("cand_ids", TensorProto.INT64, [B, 100]), ("cand_scores", TensorProto.FLOAT, [B, 100])]
    elif name == "ranker":
        inputs = [("history", [B, 50]), ("candidates", [B, 100])]
        hv = user_vec("history")
        nodes.extend([helper.make_node("Mod", ["candidates", "N1"], ["c_m"]),
                      helper.make_node("Gather", ["E", "c_m"], ["c_e"]),
                      helper.make_node("Unsqueeze", [hv, "axis2"], ["hv3"]),
                      helper.make_node("MatMul", ["c_e", "hv3"], ["dot3"]),
                      helper.make_node("Squeeze", ["dot3", "axis2"], ["dot"]),
                      helper.make_node("Sigmoid", ["dot"], ["scores"])])
        inits.append(numpy_helper.from_array(np.array([2], dtype=np.int64), "axis2"))
        outputs = [("scores", TensorProto.FLOAT, [B, 100])]
    elif name == "search_model":
        inputs = [("tokens", [B, 16]), ("user_id", [B, 1])]
        nodes.append(helper.make_node("Concat", ["tokens", "user_id"], ["tu"], axis=1))
        nodes.append(helper.make_node("MatMul", [user_vec("tu"), "ItemsT"], ["s"]))
        topk("s", 20, "item_ids", "scores")
        outputs = [("item_ids", TensorProto.INT64, [B, 20]), ("scores", TensorProto.FLOAT, [B, 20])]
    else:
        raise ValueError(f"no fixture graph for {name!r}")
    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info(n, TensorProto.INT64, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def make_repository(src: Path, dest: Path, version: int = 1) -> Path:
    """Copy ``src`` (configs, Python models) to ``dest`` and add version ``version`` of each ONNX model."""
    import onnx

    from recserve.control.state.snapshots import write_manifest

    shutil.copytree(src, dest, symlinks=True)
    for seed, name in enumerate(("retrieval", "ranker", "search_model")):
        vdir = dest / name / str(version)
        if vdir.exists():
            shutil.rmtree(vdir)
        vdir.mkdir(parents=True)
        onnx.save(_graph(name, seed), str(vdir / "model.onnx"))
        write_manifest(vdir, {"built_at": "fixture", "note": "synthetic drill fixture (untrained)"})
    return dest
