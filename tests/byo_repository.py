"""A "bring your own" Triton repository for issue 18's tests: no name, tensor or model shared with the demo.

Why: recserve must serve and guard ANY user's repository through a serving spec, so its tests need a second
repository that looks like a user's, written at test time in well under a second (ONNX graphs from
``onnx.helper`` and numpy weights, no torch, no training):

- ``features`` (ONNX, max_batch_size 16): ``raw`` FP32 [8] and ``item_ids`` INT64 [4] -> ``dense`` FP32 [8]
  (standardised) and ``slots`` INT64 [4] (ids folded into the 50 rows of the ranker's table);
- ``ctr_ranker`` (ONNX, max_batch_size 16, dynamic batching): ``dense`` FP32 [8] and ``sparse`` INT64 [4] ->
  ``score`` FP32 [1] (a Gather over a 50-row embedding table, mean-pooled, a linear layer and a sigmoid);
- ``similar_items`` (ONNX, max_batch_size 0: explicit batch-free dims): ``item_id`` INT64 [1] -> ``item_ids`` INT64
  [10] and ``scores`` FP32 [10] (top 10 by embedding dot product);
- ``query_norm`` (Python, max_batch_size 8): ``text`` BYTES [1] -> ``normalized`` BYTES [1] and ``token_ids``
  INT64 [6]; its rules live in ``textnorm.py`` beside ``model.py`` (a sibling import, as users write them);
- ``rank_page`` (ensemble of ``features`` then ``ctr_ranker``): ``raw`` FP32 [8], ``item_ids`` INT64 [4] ->
  ``ctr`` FP32 [1].

Every version that has files carries a ``manifest.json`` that ``control/state/snapshots.verify_version`` accepts;
the ensemble's empty ``1/`` has none, as the demo's ensembles. ``add_version`` writes the next version of a model
for rollout tests: ``perturbed`` (``ctr_ranker``'s weights nudged: scores move by well under 1e-2) or
``reversed`` (``ctr_ranker``'s logits negated: the order of scores reverses). ``add_unguardable`` adds what the
reference must refuse: a TensorRT model, a BLS Python step and an ensemble over that step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from recserve.control.state.snapshots import write_manifest

TABLE_ROWS = 50
DENSE, SPARSE, EMB, TOP_K, TOKENS = 8, 4, 8, 10, 6
VARIANTS = ("base", "perturbed", "reversed")
#: The one model ``add_version`` writes perturbed and reversed variants of (a step of the ``rank_page`` ensemble).
VARIED_MODEL = "ctr_ranker"
OPSET, IR_VERSION = 17, 8

# ---------------------------------------------------------------------------------------------- configs
INSTANCES = """\
# 1 CPU instance: a test repository on a shared 2-core host; a second instance would only compete for the cores.
instance_group [ { count: 1, kind: KIND_CPU } ]"""
DYNAMIC = """\
dynamic_batching {
  # No priority levels and no queue policy: with either, Triton 2.51 held requests ~500 ms (docs/holds.md).
  # 0: tests send one request at a time; waiting for a fuller batch would only add queue time.
  max_queue_delay_microseconds: 0
}"""

CONFIGS = {
    "features": f"""\
# features: standardises the page's raw features and folds item ids into the ranker's table rows.
name: "features"
backend: "onnxruntime"
max_batch_size: 16
default_model_filename: "model.onnx"
input [
  {{ name: "raw", data_type: TYPE_FP32, dims: [ {DENSE} ] }},
  {{ name: "item_ids", data_type: TYPE_INT64, dims: [ {SPARSE} ] }}
]
output [
  {{ name: "dense", data_type: TYPE_FP32, dims: [ {DENSE} ] }},
  {{ name: "slots", data_type: TYPE_INT64, dims: [ {SPARSE} ] }}
]
{INSTANCES}
{DYNAMIC}
""",
    "ctr_ranker": f"""\
# ctr_ranker: click probability of a page from dense features and sparse ids (embedding table of {TABLE_ROWS} rows).
name: "ctr_ranker"
backend: "onnxruntime"
max_batch_size: 16
default_model_filename: "model.onnx"
input [
  {{ name: "dense", data_type: TYPE_FP32, dims: [ {DENSE} ] }},
  {{ name: "sparse", data_type: TYPE_INT64, dims: [ {SPARSE} ] }}
]
output [
  {{ name: "score", data_type: TYPE_FP32, dims: [ 1 ] }}
]
{INSTANCES}
{DYNAMIC}
# 1 intra-op thread: the reference (control/spec/reference.py) reads this too, so both run the same kernels.
parameters {{ key: "intra_op_thread_count", value: {{ string_value: "1" }} }}
""",
    "similar_items": f"""\
# similar_items: the {TOP_K} items closest to one item (embedding dot product).
name: "similar_items"
backend: "onnxruntime"
# 0: no batch dimension; dims below are the full shapes, and Triton cannot batch requests of this model.
max_batch_size: 0
default_model_filename: "model.onnx"
input [
  {{ name: "item_id", data_type: TYPE_INT64, dims: [ 1 ] }}
]
output [
  {{ name: "item_ids", data_type: TYPE_INT64, dims: [ {TOP_K} ] }},
  {{ name: "scores", data_type: TYPE_FP32, dims: [ {TOP_K} ] }}
]
{INSTANCES}
# no dynamic_batching: a model without a batch dimension cannot be batched.
""",
    "query_norm": f"""\
# query_norm: a shopper's query text -> its normalised form and {TOKENS} hashed token ids (0 = padding).
name: "query_norm"
backend: "python"
max_batch_size: 8
input [
  {{ name: "text", data_type: TYPE_STRING, dims: [ 1 ] }}
]
output [
  {{ name: "normalized", data_type: TYPE_STRING, dims: [ 1 ] }},
  {{ name: "token_ids", data_type: TYPE_INT64, dims: [ {TOKENS} ] }}
]
{INSTANCES}
{DYNAMIC}
""",
    "rank_page": f"""\
# rank_page: a page's raw features and item ids -> click probability. features -> ctr_ranker.
# No scheduling of its own: an ensemble forwards each request to its steps, whose configs batch and queue.
name: "rank_page"
platform: "ensemble"
max_batch_size: 16
input [
  {{ name: "raw", data_type: TYPE_FP32, dims: [ {DENSE} ] }},
  {{ name: "item_ids", data_type: TYPE_INT64, dims: [ {SPARSE} ] }}
]
output [
  {{ name: "ctr", data_type: TYPE_FP32, dims: [ 1 ] }}
]
ensemble_scheduling {{
  step [
    {{
      model_name: "features"
      model_version: -1
      input_map {{ key: "raw", value: "raw" }}
      input_map {{ key: "item_ids", value: "item_ids" }}
      output_map {{ key: "dense", value: "_dense" }}
      output_map {{ key: "slots", value: "_slots" }}
    }},
    {{
      model_name: "ctr_ranker"
      model_version: -1
      input_map {{ key: "dense", value: "_dense" }}
      input_map {{ key: "sparse", value: "_slots" }}
      output_map {{ key: "score", value: "ctr" }}
    }}
  ]
}}
""",
}

# ---------------------------------------------------------------------------------------------- python step
TEXTNORM_PY = f'''\
"""query_norm's rules: NFKC, lower case, words of letters and digits joined by one space; token ids by crc32."""

from __future__ import annotations

import re
import unicodedata
import zlib

import numpy as np

TOKENS = {TOKENS}
BUCKETS = 1000
MAX_BYTES = 200


def normalize(raw: bytes) -> str:
    """ValueError for what the model refuses: not UTF-8, too long, or no word at all."""
    if len(raw) > MAX_BYTES:
        raise ValueError(f"text is {{len(raw)}} bytes, at most {{MAX_BYTES}}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("text is not UTF-8") from None
    words = re.findall(r"\\w+", unicodedata.normalize("NFKC", text).lower())
    if not words:
        raise ValueError("text has no word")
    return " ".join(words)


def token_ids(normalized: str) -> np.ndarray:
    ids = [zlib.crc32(w.encode("utf-8")) % BUCKETS + 1 for w in normalized.split(" ")][:TOKENS]
    return np.asarray(ids + [0] * (TOKENS - len(ids)), dtype=np.int64)
'''

QUERY_NORM_PY = '''\
"""query_norm: normalise a query and hash its words; the rules are in textnorm.py beside this file."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import textnorm  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        out = pb_utils.get_output_config_by_name(config, "token_ids")
        self.token_dtype = pb_utils.triton_string_to_numpy(out["data_type"])
        self.width = int(out["dims"][0])

    def execute(self, requests):
        responses = []
        for request in requests:
            texts = pb_utils.get_input_tensor_by_name(request, "text").as_numpy().reshape(-1)
            try:
                normalized = [textnorm.normalize(t if isinstance(t, bytes) else str(t).encode()) for t in texts]
            except ValueError as exc:
                err = pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=err))
                continue
            ids = np.stack([textnorm.token_ids(n)[: self.width] for n in normalized]).astype(self.token_dtype)
            out = np.array([n.encode("utf-8") for n in normalized], dtype=np.object_).reshape(-1, 1)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("normalized", out), pb_utils.Tensor("token_ids", ids)]))
        return responses

    def finalize(self):
        pb_utils.Logger.log_info("query_norm finalized")
'''

BLS_PY = '''\
"""page_router: asks ctr_ranker itself (BLS), which only Triton can do."""

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            call = pb_utils.InferenceRequest(
                model_name="ctr_ranker", requested_output_names=["score"],
                inputs=[pb_utils.get_input_tensor_by_name(request, "dense"),
                        pb_utils.get_input_tensor_by_name(request, "sparse")])
            answer = call.exec()
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.get_output_tensor_by_name(answer, "score")]))
        return responses
'''


# ---------------------------------------------------------------------------------------------- ONNX graphs
def _save(graph: onnx.GraphProto, path: Path) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="byo_repository")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())


def _const(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(array, name)


def features_graph() -> onnx.GraphProto:
    rng = np.random.default_rng(11)
    mean = rng.normal(0, 1, DENSE).astype(np.float32)
    inv_std = (1.0 / rng.uniform(0.5, 2.0, DENSE)).astype(np.float32)
    nodes = [
        helper.make_node("Sub", ["raw", "mean"], ["centred"]),
        helper.make_node("Mul", ["centred", "inv_std"], ["dense"]),
        helper.make_node("Abs", ["item_ids"], ["abs_ids"]),
        helper.make_node("Mod", ["abs_ids", "rows"], ["slots"]),
    ]
    return helper.make_graph(
        nodes, "features",
        [helper.make_tensor_value_info("raw", TensorProto.FLOAT, ["batch", DENSE]),
         helper.make_tensor_value_info("item_ids", TensorProto.INT64, ["batch", SPARSE])],
        [helper.make_tensor_value_info("dense", TensorProto.FLOAT, ["batch", DENSE]),
         helper.make_tensor_value_info("slots", TensorProto.INT64, ["batch", SPARSE])],
        [_const("mean", mean), _const("inv_std", inv_std), _const("rows", np.array(TABLE_ROWS, dtype=np.int64))],
    )


def ctr_weights(variant: str = "base") -> dict[str, np.ndarray]:
    """The ranker's weights; ``perturbed`` nudges them (scores move < 1e-2), ``reversed`` negates the logits."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    rng = np.random.default_rng(7)
    w = {"table": rng.normal(0, 0.5, (TABLE_ROWS, EMB)).astype(np.float32),
         "weight": rng.normal(0, 0.3, (DENSE + EMB, 1)).astype(np.float32),
         "bias": np.array([0.1], dtype=np.float32)}
    if variant == "perturbed":
        nudge = np.random.default_rng(8)
        w = {k: (v + nudge.normal(0, 1e-3, v.shape)).astype(np.float32) for k, v in w.items()}
    elif variant == "reversed":  # sigmoid(-x): every pair of scores swaps order
        w = {"table": w["table"], "weight": -w["weight"], "bias": -w["bias"]}
    return w


def ctr_graph(variant: str = "base") -> onnx.GraphProto:
    w = ctr_weights(variant)
    nodes = [
        helper.make_node("Gather", ["table", "sparse"], ["embedded"], axis=0),  # [B, 4, EMB]
        helper.make_node("ReduceMean", ["embedded"], ["pooled"], axes=[1], keepdims=0),  # [B, EMB]
        helper.make_node("Concat", ["dense", "pooled"], ["joined"], axis=1),  # [B, DENSE + EMB]
        helper.make_node("MatMul", ["joined", "weight"], ["product"]),
        helper.make_node("Add", ["product", "bias"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["score"]),
    ]
    return helper.make_graph(
        nodes, "ctr_ranker",
        [helper.make_tensor_value_info("dense", TensorProto.FLOAT, ["batch", DENSE]),
         helper.make_tensor_value_info("sparse", TensorProto.INT64, ["batch", SPARSE])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch", 1])],
        [_const("table", w["table"]), _const("weight", w["weight"]), _const("bias", w["bias"])],
    )


def similar_graph() -> onnx.GraphProto:
    rng = np.random.default_rng(5)
    items = rng.normal(0, 1, (TABLE_ROWS, EMB)).astype(np.float32)
    nodes = [
        helper.make_node("Abs", ["item_id"], ["abs_id"]),
        helper.make_node("Mod", ["abs_id", "rows"], ["row"]),
        helper.make_node("Gather", ["items", "row"], ["query"], axis=0),  # [1, EMB]
        helper.make_node("MatMul", ["query", "items_t"], ["sims"]),  # [1, ROWS]
        helper.make_node("TopK", ["sims", "k"], ["top_scores", "top_rows"], axis=1, largest=1, sorted=1),
        helper.make_node("Reshape", ["top_scores", "flat"], ["scores"]),
        helper.make_node("Reshape", ["top_rows", "flat"], ["item_ids"]),
    ]
    return helper.make_graph(
        nodes, "similar_items",
        [helper.make_tensor_value_info("item_id", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("item_ids", TensorProto.INT64, [TOP_K]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, [TOP_K])],
        [_const("items", items), _const("items_t", np.ascontiguousarray(items.T)),
         _const("rows", np.array(TABLE_ROWS, dtype=np.int64)), _const("k", np.array([TOP_K], dtype=np.int64)),
         _const("flat", np.array([TOP_K], dtype=np.int64))],
    )


# ---------------------------------------------------------------------------------------------- writing
def _write_files(vdir: Path, model: str, variant: str) -> None:
    if variant != "base" and model != VARIED_MODEL:
        raise ValueError(f"variant {variant!r} exists for {VARIED_MODEL} only")
    if model == "features":
        _save(features_graph(), vdir / "model.onnx")
    elif model == "ctr_ranker":
        _save(ctr_graph(variant), vdir / "model.onnx")
    elif model == "similar_items":
        _save(similar_graph(), vdir / "model.onnx")
    elif model == "query_norm":
        vdir.mkdir(parents=True, exist_ok=True)
        (vdir / "model.py").write_text(QUERY_NORM_PY)
        (vdir / "textnorm.py").write_text(TEXTNORM_PY)
    else:
        raise ValueError(f"no files to write for model {model!r}")
    write_manifest(vdir, {"model": model, "version": int(vdir.name), "variant": variant,
                          "built_at": "tests/byo_repository.py"})


def add_version(repo: Path, model: str, variant: str = "base") -> int:
    """Write the next version of ``model`` (``variant`` for ctr_ranker: base, perturbed, reversed); its number."""
    mdir = Path(repo) / model
    if not (mdir / "config.pbtxt").is_file():
        raise ValueError(f"no model {model!r} in {repo}")
    versions = [int(p.name) for p in mdir.iterdir() if p.is_dir() and p.name.isdigit()]
    version = max(versions, default=0) + 1
    _write_files(mdir / str(version), model, variant)
    return version


def make_repository(dest: Path, *, variant: str = "base") -> Path:
    """Write the repository under ``dest`` (created; must not hold one yet): version 1 of every model, and with
    ``variant`` "perturbed" or "reversed" also version 2 of ctr_ranker in that variant. Returns ``dest``."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for model, config in CONFIGS.items():
        (dest / model).mkdir()
        (dest / model / "config.pbtxt").write_text(config)
        if model == "rank_page":
            (dest / model / "1").mkdir()  # Triton needs a version directory, even an ensemble's
        else:
            _write_files(dest / model / "1", model, "base")
    if variant != "base":
        add_version(dest, "ctr_ranker", variant)
    return dest


def add_unguardable(repo: Path) -> dict[str, str]:
    """Add what the reference cannot compute, with the words its reason should contain: a TensorRT model
    (``ctr_ranker_gpu``), a BLS Python step (``page_router``) and an ensemble over it (``rank_page_bls``)."""
    repo = Path(repo)
    gpu = CONFIGS["ctr_ranker"].replace('"ctr_ranker"', '"ctr_ranker_gpu"').replace(
        'backend: "onnxruntime"', 'backend: "tensorrt"').replace('"model.onnx"', '"model.plan"').replace(
        "kind: KIND_CPU", "kind: KIND_GPU")
    (repo / "ctr_ranker_gpu" / "1").mkdir(parents=True)
    (repo / "ctr_ranker_gpu" / "config.pbtxt").write_text(gpu)
    (repo / "ctr_ranker_gpu" / "1" / "model.plan").write_bytes(b"not an engine: the reference must not open it")
    router = CONFIGS["ctr_ranker"].replace('"ctr_ranker"', '"page_router"').replace(
        'backend: "onnxruntime"', 'backend: "python"').replace('default_model_filename: "model.onnx"\n', "")
    (repo / "page_router" / "1").mkdir(parents=True)
    (repo / "page_router" / "config.pbtxt").write_text(router)
    (repo / "page_router" / "1" / "model.py").write_text(BLS_PY)
    ens = CONFIGS["rank_page"].replace('"rank_page"', '"rank_page_bls"').replace(
        'model_name: "ctr_ranker"', 'model_name: "page_router"')
    (repo / "rank_page_bls" / "1").mkdir(parents=True)
    (repo / "rank_page_bls" / "config.pbtxt").write_text(ens)
    return {"ctr_ranker_gpu": "needs a GPU", "page_router": "BLS", "rank_page_bls": "step 'page_router'"}
