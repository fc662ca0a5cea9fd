"""The serving spec's reference (control/spec/reference.py): expected answers of ANY repository, outside Triton.

Why these checks: a golden check is only as good as its expected answer. The generic reference must (a) agree
with the demo's hand-written reference (build/reference.py) on the demo repository, (b) agree bit for bit with a
real tritonserver on a repository that shares nothing with the demo (tests/byo_repository.py: an ensemble, a
two-output model, a Python BYTES step, a model without a batch dimension), and (c) say why, instead of guessing,
where it cannot compute an answer (TensorRT, BLS).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from recserve.control.runtime.triton import DEFAULT_REPOSITORY, TritonConfig, TritonServer
from recserve.control.spec import pbstub
from recserve.control.spec.reference import InferenceError, Reference, ReferenceError, model_config_json
from recserve.control.state.snapshots import verify_version
from tests.byo_repository import add_unguardable, add_version, make_repository

SERVED = ("rank_page", "similar_items", "query_norm")  # loading rank_page loads features and ctr_ranker
RNG = np.random.default_rng(2024)


def _requests() -> dict[str, list[dict[str, np.ndarray]]]:
    """Requests to every model of the generated repository (batched models: with the batch dimension)."""
    texts = ["  Red LEATHER boots!! ", "ﬁne Café au lait", "x", "sneakers size 44 black white running trail"]
    return {
        "rank_page": [{"raw": RNG.normal(size=(b, 8)).astype(np.float32),
                       "item_ids": RNG.integers(-500, 5000, (b, 4)).astype(np.int64)} for b in (1, 3)],
        "features": [{"raw": RNG.normal(size=(2, 8)).astype(np.float32),
                      "item_ids": RNG.integers(0, 200, (2, 4)).astype(np.int64)}],
        "ctr_ranker": [{"dense": RNG.normal(size=(4, 8)).astype(np.float32),
                        "sparse": RNG.integers(0, 50, (4, 4)).astype(np.int64)}],
        "similar_items": [{"item_id": np.array([i], dtype=np.int64)} for i in (7, 123, -3)],
        "query_norm": [{"text": np.array([[t.encode()] for t in texts[:1]], dtype=object)},
                       {"text": np.array([[t.encode()] for t in texts], dtype=object)}],
    }


def _datatype(array: np.ndarray) -> str:
    return {"float32": "FP32", "int64": "INT64", "object": "BYTES"}[array.dtype.name]


def _served(client: grpcclient.InferenceServerClient, model: str, inputs: dict[str, np.ndarray]) -> dict:
    tensors = []
    for name, array in inputs.items():
        t = grpcclient.InferInput(name, list(array.shape), _datatype(array))
        t.set_data_from_numpy(array)
        tensors.append(t)
    result = client.infer(model, tensors)
    return {o["name"]: result.as_numpy(o["name"]) for o in result.get_response(as_json=True)["outputs"]}


def _same(expected: np.ndarray, served: np.ndarray) -> bool:
    """Bit for bit: dtype, shape and every byte (BYTES: every element's bytes)."""
    if expected.dtype != served.dtype or expected.shape != served.shape:
        return False
    if expected.dtype == object:
        return expected.tolist() == served.tolist()
    return expected.tobytes() == served.tobytes()


# ---------------------------------------------------------------------------------------------- (a) the demo
def test_generic_reference_equals_the_demo_reference_on_recommend_and_search():
    from recserve.build.reference import Reference as DemoReference

    try:
        demo = DemoReference.latest(DEFAULT_REPOSITORY)
    except FileNotFoundError:
        pytest.skip("no built model versions: run 'make models'")
    bare = {"shaping", "ranking", "tokenizer", "triton_python_backend_utils"}
    found = {n: sys.modules[n] for n in bare if n in sys.modules}  # what other code left is not ours to judge
    with Reference(DEFAULT_REPOSITORY, versions=demo.versions) as generic:
        for user_id, history in [(3, [10, 11, 12]), (7, []), (1499, list(range(1, 80))), (987654, [5, 0, 5])]:
            got = generic.infer("recommend", {"user_id": np.array([[user_id]], dtype=np.int64),
                                              "history": np.asarray([history], dtype=np.int64).reshape(1, -1)})
            ids, scores = demo.recommend(user_id, history)
            assert got["item_ids"].shape == (1, 20) and got["item_ids"].dtype == np.int64
            assert np.array_equal(got["item_ids"][0], ids), (user_id, history)
            np.testing.assert_allclose(got["scores"][0], scores, rtol=0, atol=1e-6)
        for query, user_id in [("red leather boots", 3), ("wireless headphones", None), ("x", 12)]:
            inputs = {"query": np.array([[query.encode()]], dtype=object)}
            if user_id is not None:
                inputs["user_id"] = np.array([[user_id]], dtype=np.int64)
            got = generic.infer("search", inputs)
            ids, scores = demo.search(query, user_id)
            assert np.array_equal(got["item_ids"][0], ids), query
            np.testing.assert_allclose(got["scores"][0], scores, rtol=0, atol=1e-6)
        # a request the served ensemble refuses is refused by both, with recommend_pre's own words
        with pytest.raises(InferenceError, match="must be >= 0") as refused:
            generic.infer("recommend", {"user_id": np.array([[-1]]), "history": np.array([[1]])})
        assert refused.value.code == "INVALID_ARG" and refused.value.model == "recommend_pre"
        with pytest.raises(ValueError, match="must be >= 0"):
            demo.recommend(-1, [1])
    # the demo's Python steps import sibling modules by bare name: none is left behind for the next model.py
    assert {n: sys.modules[n] for n in bare if n in sys.modules} == found


# ---------------------------------------------------------------------------------------------- (b) a real server
@pytest.fixture(scope="module")
def byo(tmp_path_factory):
    return make_repository(tmp_path_factory.mktemp("byo") / "repository")


@pytest.fixture(scope="module")
def byo_server(byo, tmp_path_factory):
    srv = TritonServer(TritonConfig(model_repository=byo, workdir=tmp_path_factory.mktemp("byo_triton"),
                                    models=list(SERVED), name="byo"))
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


def test_generated_repository_versions_verify(byo):
    for model in ("features", "ctr_ranker", "similar_items", "query_norm"):
        info = verify_version(byo, model, 1)
        assert info.verified, info.problem


def test_reference_equals_a_real_tritonserver_bit_for_bit(byo, byo_server):
    client = grpcclient.InferenceServerClient(byo_server.grpc_url)
    try:
        with Reference(byo) as ref:
            assert all(why is None for why in ref.reasons().values()), ref.reasons()
            for model, requests in _requests().items():
                for inputs in requests:
                    expected = ref.infer(model, inputs)
                    served = _served(client, model, inputs)
                    assert sorted(expected) == sorted(served), model
                    for name in expected:
                        assert _same(expected[name], served[name]), (
                            f"{model}.{name}: reference {expected[name].dtype}{expected[name].shape} "
                            f"{expected[name].ravel()[:6]} != served {served[name].dtype}{served[name].shape} "
                            f"{served[name].ravel()[:6]}")
            # a request the Python step refuses: the same refusal, in the same words
            bad = {"text": np.array([[b"  !!  "]], dtype=object)}
            with pytest.raises(InferenceError, match="text has no word") as refused:
                ref.infer("query_norm", bad)
            assert refused.value.code == "INVALID_ARG"
            with pytest.raises(InferenceServerException, match="text has no word") as served_refusal:
                _served(client, "query_norm", bad)
            assert served_refusal.value.status() == "StatusCode.INVALID_ARGUMENT"
            # the config a model.py reads in initialize(): Triton's JSON (proto field names, int64 as numbers)
            ours = json.loads(model_config_json(ref.config("query_norm")))
            theirs = byo_server.model_config("query_norm")
            for key in ("input", "output"):
                assert [(t["name"], t["data_type"], t["dims"]) for t in ours[key]] == \
                       [(t["name"], t["data_type"], t["dims"]) for t in theirs[key]]
            assert ours["max_batch_size"] == theirs["max_batch_size"] == 8
    finally:
        client.close()


# ---------------------------------------------------------------------------------------------- versions, isolation
def test_rollout_variants_and_pinned_versions(tmp_path):
    repo = make_repository(tmp_path / "repo", variant="perturbed")
    assert add_version(repo, "ctr_ranker", "reversed") == 3
    assert all(verify_version(repo, "ctr_ranker", v).verified for v in (1, 2, 3))
    inputs = {"raw": RNG.normal(size=(16, 8)).astype(np.float32),
              "item_ids": RNG.integers(0, 1000, (16, 4)).astype(np.int64)}
    ctr = {v: Reference(repo, {"ctr_ranker": v}).infer("rank_page", inputs)["ctr"].ravel() for v in (1, 2, 3)}
    assert Reference(repo).versions["ctr_ranker"] == 3  # None = the latest on disk
    assert 0 < np.abs(ctr[2] - ctr[1]).max() < 1e-2, "perturbed: close to version 1, yet not equal"
    assert np.array_equal(np.argsort(ctr[3]), np.argsort(ctr[1])[::-1]), "reversed: the order of scores reverses"


def test_each_version_of_a_python_step_imports_its_own_sibling_module(tmp_path):
    repo = make_repository(tmp_path / "repo")
    v2 = add_version(repo, "query_norm")
    rules = repo / "query_norm" / str(v2) / "textnorm.py"
    rules.write_text(rules.read_text().replace("BUCKETS = 1000", "BUCKETS = 7"))
    text = {"text": np.array([[b"Leather Boots"]], dtype=object)}
    with Reference(repo, {"query_norm": 1}) as one, Reference(repo, {"query_norm": 2}) as two:
        for _ in range(2):  # interleaved: each keeps its own textnorm
            ids1 = one.infer("query_norm", text)["token_ids"]
            ids2 = two.infer("query_norm", text)["token_ids"]
            assert ids1.max() > 7 and 1 <= ids2[0, :2].min() and ids2.max() <= 7
    assert "textnorm" not in sys.modules and "triton_python_backend_utils" not in sys.modules


# ---------------------------------------------------------------------------------------------- (c) why not
def test_why_not_names_tensorrt_bls_and_the_ensemble_step(tmp_path):
    repo = make_repository(tmp_path / "repo")
    expected_words = add_unguardable(repo)
    ref = Reference(repo)
    for model, words in expected_words.items():
        why = ref.why_not(model)
        assert why and words in why, (model, why)
        with pytest.raises(ReferenceError, match=model) as refused:
            ref.infer(model, {})
        assert refused.value.model == model and words in refused.value.why
    assert "InferenceRequest" in ref.why_not("page_router")
    assert ref.why_not("rank_page") is None and ref.why_not("query_norm") is None
    assert "no model 'nope'" in ref.why_not("nope")
    # the demo's TensorRT twins, whose engines are not even built here
    demo = Reference(DEFAULT_REPOSITORY)
    assert "needs a GPU" in demo.why_not("ranker_trt")
    assert "step 'retrieval_trt'" in demo.why_not("recommend_trt")
    # a BLS call that only shows at run time meets the stand-in's refusal
    with pytest.raises(pbstub.NotSupportedOutsideTriton, match="BLS is not supported by the reference"):
        pbstub.InferenceRequest(model_name="ctr_ranker", requested_output_names=["score"], inputs=[])


def test_a_model_py_that_cannot_import_outside_triton_is_named(tmp_path):
    repo = make_repository(tmp_path / "repo")
    model_py = repo / "query_norm" / "1" / "model.py"
    model_py.write_text(model_py.read_text().replace("import json\n", "import json\nimport triton_only_module_xyz\n"))
    why = Reference(repo).why_not("query_norm")
    assert why and "cannot run outside Triton" in why and "triton_only_module_xyz" in why
