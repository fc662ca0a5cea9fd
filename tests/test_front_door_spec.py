"""The front door's body limits from a serving spec (``recctl up --spec``): each client-facing model's largest request
at its max_batch, over gRPC and HTTP/JSON, the largest over models plus framing; a variable dimension without a
``length`` is refused before anything starts; BYTES inputs get a documented default bound, said in a warning.

Configs and golden files only: no process (recctl's refusal runs as a subprocess and starts nothing)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from recserve.control.api.server import front_door, parse_args
from recserve.control.routing.frontdoor import (
    DEFAULT_BYTES_ELEMENT,
    FRAMING_HEADROOM,
    GRPC_MAX_BODY,
    HTTP_MAX_BODY,
    JSON_INT64_CHARS,
    FrontDoorError,
    frontdoor_lines,
    spec_body_limits,
)
from recserve.control.spec.spec import load_spec
from tests.byo_repository import CONFIGS

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "model_repository"


def _configs(dest: Path, source: Path | None = None) -> Path:
    """A repository of configs only (the spec reads nothing else): the demo's, or the byo repository's."""
    if source is not None:
        for cfg in source.glob("*/config.pbtxt"):
            (dest / cfg.parent.name / "1").mkdir(parents=True)
            shutil.copy(cfg, dest / cfg.parent.name / "config.pbtxt")
        return dest
    for name, cfg in CONFIGS.items():
        (dest / name / "1").mkdir(parents=True)
        (dest / name / "config.pbtxt").write_text(cfg)
    return dest


def _spec(tmp_path: Path, models: dict, golden: dict[str, list], repo: str = "repo") -> Path:
    for name, data in golden.items():
        (tmp_path / f"{name}.json").write_text(json.dumps({"data": data}))
    doc = {"schemaVersion": 1, "repository": repo,
           "models": {n: {"golden": f"{n}.json"} | m for n, m in models.items()}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(doc))
    return tmp_path / "spec.yaml"


RECOMMEND = {"outputs": {"item_ids": {"compare": "exact"}},
             "inputs": {"user_id": {"range": [0, 100]}, "history": {"range": [0, 100], "length": [1, 1000]}}}
RECOMMEND_GOLDEN = [{"user_id": {"content": [7], "shape": [1]}, "history": {"content": [1, 2, 3], "shape": [3]}}]


def test_the_demos_recommend_as_a_spec_gives_the_demos_grpc_limit_at_batch_8(tmp_path):
    _configs(tmp_path / "repo", DEMO)
    spec = load_spec(_spec(tmp_path, {"recommend": RECOMMEND}, {"recommend": RECOMMEND_GOLDEN}))
    assert spec.models["recommend"].max_batch == 8  # the spec's default
    limits = spec_body_limits(spec)
    # 8 x (1 user id + 1000 history) INT64 as varints: the demo's default, computed the demo's way
    assert limits.grpc == GRPC_MAX_BODY == 8 * 1001 * 10 + FRAMING_HEADROOM
    # HTTP at the same batch 8 (the demo's default covers batch 4 only)
    assert limits.http == 8 * 1001 * JSON_INT64_CHARS + FRAMING_HEADROOM > HTTP_MAX_BODY
    assert limits.grpc_model == limits.http_model == "recommend" and limits.batches == {"recommend": 8}
    # a larger batch: twice the tensor bytes, and a warning that HAProxy's global buffer passes the cheap size
    bigger = dataclasses.replace(spec, models={"recommend": dataclasses.replace(spec.models["recommend"],
                                                                                max_batch=64)})
    big = spec_body_limits(bigger)
    assert big.grpc == 64 * 1001 * 10 + FRAMING_HEADROOM
    assert any("tune.bufsize" in w and "global" in w for w in big.warnings), big.warnings


def test_max_batch_in_the_spec_sets_the_limit(tmp_path):
    _configs(tmp_path / "repo", DEMO)
    spec = load_spec(_spec(tmp_path, {"recommend": RECOMMEND | {"maxBatch": 2}}, {"recommend": RECOMMEND_GOLDEN}))
    assert spec.models["recommend"].max_batch == 2
    assert spec_body_limits(spec).grpc == 2 * 1001 * 10 + FRAMING_HEADROOM


def test_a_variable_dimension_without_length_is_refused_naming_the_field(tmp_path):
    _configs(tmp_path / "repo", DEMO)
    no_length = {"outputs": RECOMMEND["outputs"],
                 "inputs": {"user_id": {"range": [0, 100]}, "history": {"range": [0, 100]}}}
    spec = load_spec(_spec(tmp_path, {"recommend": no_length}, {"recommend": RECOMMEND_GOLDEN}))
    with pytest.raises(FrontDoorError) as e:
        spec_body_limits(spec)
    msg = str(e.value)
    assert "models.recommend.inputs.history" in msg and "length: [low, high]" in msg and str(spec.path) in msg


def test_a_user_repository_is_bounded_by_its_largest_model_and_bytes_inputs_say_their_default(tmp_path):
    _configs(tmp_path / "repo")
    text = {"outputs": {"token_ids": {"compare": "exact"}}, "inputs": {"text": {"values": ["shoes", "red hat"]}}}
    page = {"outputs": {"ctr": {"compare": "close", "atol": 1e-5}}}
    similar = {"outputs": {"item_ids": {"compare": "exact"}}}
    golden = {"query_norm": [{"text": {"content": ["shoes"], "shape": [1]}}],
              "rank_page": [{"raw": {"content": [0.0] * 8, "shape": [8]},
                             "item_ids": {"content": [1, 2, 3, 4], "shape": [4]}}],
              "similar_items": [{"item_id": {"content": [3], "shape": [1]}}]}
    spec = load_spec(_spec(tmp_path, {"query_norm": text, "rank_page": page, "similar_items": similar}, golden))
    limits = spec_body_limits(spec)
    assert limits.batches == {"query_norm": 8, "rank_page": 8, "similar_items": 1}  # similar_items: no batch dim
    # query_norm: 8 strings of at most DEFAULT_BYTES_ELEMENT bytes (+6 framing each) beat rank_page's 8 x (8 FP32 +
    # 4 INT64 varints) over gRPC; as JSON, every byte may be a 6-character escape
    assert limits.grpc == 8 * (DEFAULT_BYTES_ELEMENT + 6) + FRAMING_HEADROOM and limits.grpc_model == "query_norm"
    assert limits.http == 8 * (6 * DEFAULT_BYTES_ELEMENT + 3) + FRAMING_HEADROOM
    (warning,) = limits.warnings
    assert "models.query_norm.inputs.text" in warning and f"{DEFAULT_BYTES_ELEMENT} bytes per element" in warning
    assert "--max-grpc-body" in warning
    # a golden string longer than the default raises the bound to it
    golden["query_norm"] = [{"text": {"content": ["x" * 3000], "shape": [1]}}]
    spec = load_spec(_spec(tmp_path, {"query_norm": text}, {"query_norm": golden["query_norm"]}))
    limits = spec_body_limits(spec)
    assert limits.grpc == 8 * (3000 + 6) + FRAMING_HEADROOM and "longest of its values" in limits.warnings[0]
    # without query_norm the numeric models set the limits exactly
    spec = load_spec(_spec(tmp_path, {"rank_page": page, "similar_items": similar}, golden))
    limits = spec_body_limits(spec)
    assert limits.grpc == 8 * (8 * 4 + 4 * 10) + FRAMING_HEADROOM and limits.warnings == ()
    assert limits.http == 8 * (8 * 25 + 4 * JSON_INT64_CHARS) + FRAMING_HEADROOM


def test_the_control_plane_uses_the_spec_limits_unless_a_flag_says_otherwise(tmp_path):
    _configs(tmp_path / "repo", DEMO)
    spec = load_spec(_spec(tmp_path, {"recommend": RECOMMEND}, {"recommend": RECOMMEND_GOLDEN}))
    front, limits = front_door(parse_args([]), spec)
    assert (front.max_grpc_body, front.max_http_body) == (limits.grpc, limits.http)
    assert f"req.body_len gt {limits.grpc}" in "\n".join(frontdoor_lines(front, "grpc", 8001, tmp_path))
    assert f"content-length) -m int gt {limits.http}" in "\n".join(frontdoor_lines(front, "http", 8000, tmp_path))
    front, limits = front_door(parse_args(["--max-grpc-body", "500000"]), spec)
    assert front.max_grpc_body == 500000 and front.max_http_body == limits.http
    front, limits = front_door(parse_args(["--max-grpc-body", "500000", "--max-http-body", "600000"]), spec)
    assert (front.max_grpc_body, front.max_http_body, limits) == (500000, 600000, None)
    front, limits = front_door(parse_args([]), None)  # no spec: the demo's contract, as before
    assert (front.max_grpc_body, front.max_http_body, limits) == (GRPC_MAX_BODY, HTTP_MAX_BODY, None)


def test_recctl_up_refuses_an_unbounded_spec_before_anything_starts(tmp_path):
    _configs(tmp_path / "repo", DEMO)
    no_length = {"outputs": RECOMMEND["outputs"], "inputs": {"history": {"range": [0, 100]}}}
    path = _spec(tmp_path, {"recommend": no_length}, {"recommend": RECOMMEND_GOLDEN})
    r = subprocess.run([sys.executable, "-m", "recserve.control.recctl", "--root", str(tmp_path / "root"), "up",
                        "--spec", str(path)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2, r.stderr
    assert "models.recommend.inputs.history" in r.stderr and "length" in r.stderr
    assert not (tmp_path / "root" / "control.pid").exists()
