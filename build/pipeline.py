"""recserve build pipeline: data -> training (cached) -> ONNX + parity -> TensorRT (GPU hosts) -> new
numbered model versions with manifests -> golden requests -> summary.

    python -m recserve.build.pipeline [--repository model_repository] [--work-dir artifacts] [--seed 7]
                             [--data-csv EVENTS.csv [--catalog-csv CATALOG.csv]] [--no-trt]

Why this shape: every run writes NEW versions (never touching old ones) so rollback is always possible,
and a rerun with unchanged code, data, seed and hyper-parameters reuses the cached training so that
rebuilding artifacts (e.g. after a lost model repository) is fast and gives the same weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

# Before torch loads: OpenMP threads that spin-wait collapse when the 2 cores are shared with other work
# (measured on a loaded 2-core host: training steps 6-13x slower with the default spinning).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402
from rich.table import Table  # noqa: E402

from recserve.build import data as data_mod  # noqa: E402
from recserve.build import export as export_mod  # noqa: E402
from recserve.build import manifest as manifest_mod  # noqa: E402
from recserve.build import reference as reference_mod  # noqa: E402
from recserve.build import spec_golden  # noqa: E402
from recserve.build import trt as trt_mod  # noqa: E402
from recserve.build.models import EXCLUDE_LEN, HISTORY_LEN, RankerGraph, RetrievalGraph, SearchGraph  # noqa: E402
from recserve.build.train import (  # noqa: E402
    REPO_ROOT,
    TOKENIZER_PATH,
    HParams,
    Trained,
    check_size,
    lexical_hit_queries,
    load_tokenizer,
    make_split,
    new_models,
    retrieval_eval_requests,
    search_eval_set,
    train_all,
)

MODELS = ("retrieval", "ranker", "search_model")
console = Console(highlight=False)
if not console.is_terminal:  # CI logs and pipes: room for the summary table
    console = Console(highlight=False, width=120)


def log(msg: str) -> None:
    console.print(msg)


# ------------------------------------------------------------------------------------------------- data


def prepare_data(
    work_dir: Path, seed: int, data_csv: Path | None, catalog_csv: Path | None
) -> tuple[data_mod.Dataset, dict]:
    """Load (external) or generate-if-needed (synthetic) data; returns the dataset and its provenance."""
    ddir = work_dir / "data"
    if data_csv is not None:
        ds = data_mod.load(data_csv, catalog_csv)
        ext = ddir / "external"
        maps = data_mod.write_id_maps(ds, ext)
        catalog = data_mod.write_catalog(ds, ext / "catalog.csv")
        files = [data_csv] + ([catalog_csv] if catalog_csv else [])
        identity = all(data_mod.is_identity(m) for m in ds.id_maps.values())
        log(
            f"data: {data_csv} ({ds.n_events} events, {ds.n_users} users, {ds.n_items} items); "
            f"ids {'already dense' if identity else 'remapped to dense 1..N'} -> {ext}/*_map.csv"
        )
        return ds, {
            "source": "external",
            "files": [str(p) for p in files],
            "catalog": str(catalog),
            "id_maps": [str(p) for p in maps],
            "id_mapping_identity": identity,
            "sha256": {Path(p).name: manifest_mod.sha256_file(p) for p in files},
        }
    cfg = data_mod.GenConfig(seed=seed)
    meta_path = ddir / "meta.json"
    paths = {"events": ddir / "events.csv", "catalog": ddir / "catalog.csv", "ground_truth": ddir / "ground_truth.json"}
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    if meta != {"generator": asdict(cfg)} or not all(p.is_file() for p in paths.values()):
        t = time.perf_counter()
        data_mod.generate(ddir, cfg)
        meta_path.write_text(json.dumps({"generator": asdict(cfg)}, indent=1) + "\n")
        log(f"data: generated synthetic data (seed {seed}) in {time.perf_counter() - t:.1f} s -> {ddir}")
    else:
        log(f"data: reusing {ddir} (seed {seed})")
    ds = data_mod.load(paths["events"], paths["catalog"])
    return ds, {
        "source": "synthetic",
        "seed": seed,
        "generator": asdict(cfg),
        "files": [str(paths["events"]), str(paths["catalog"])],
        "catalog": str(paths["catalog"]),
        "id_mapping_identity": True,
        "sha256": {p.name: manifest_mod.sha256_file(p) for p in (paths["events"], paths["catalog"])},
    }


# ---------------------------------------------------------------------------------------------- caching


def cache_key(data_files: list[str], seed: int, hp: HParams) -> str:
    """sha256 of build/*.py, the tokenizer, the data files, the seed and the hyper-parameters."""
    h = hashlib.sha256()
    for p in sorted((REPO_ROOT / "build").glob("*.py")):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    h.update(TOKENIZER_PATH.read_bytes() + b"\0")
    for f in data_files:
        h.update(manifest_mod.sha256_file(f).encode())
    h.update(json.dumps({"seed": seed, "hparams": hp.as_dict()}, sort_keys=True).encode())
    return h.hexdigest()


def train_or_load(ds: data_mod.Dataset, hp: HParams, seed: int, key: str, cache_root: Path) -> Trained:
    cdir = cache_root / key[:16]
    weights, metrics_path = cdir / "weights.pt", cdir / "metrics.json"
    if weights.is_file() and metrics_path.is_file():
        log(f"training: cached (key {key[:16]})")
        torch.set_num_threads(2)
        tok = load_tokenizer()
        retr, rank, search = new_models(ds, make_split(ds, hp.holdout_days), hp, seed, tok)
        state = torch.load(weights, map_location="cpu", weights_only=True)
        for m, k in ((retr, "retrieval"), (rank, "ranker"), (search, "search")):
            m.load_state_dict(state[k])
            m.eval()
        return Trained(retr, rank, search, json.loads(metrics_path.read_text()))
    log(f"training: key {key[:16]} not cached; training retrieval, ranker, search on 2 threads")
    t = time.perf_counter()
    with Progress(
        TextColumn("  {task.description:<10}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bar:
        tasks: dict[str, int] = {}

        def progress(name: str, done: int, total: int) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(name, total=total)
            bar.update(tasks[name], completed=done)

        tr = train_all(ds, hp, seed, progress, log=lambda _m: None)
    tr.metrics["train_seconds"]["total_with_eval"] = round(time.perf_counter() - t, 1)
    cdir.mkdir(parents=True, exist_ok=True)
    tmp = cdir / "weights.pt.tmp"
    torch.save(
        {"retrieval": tr.retrieval.state_dict(), "ranker": tr.ranker.state_dict(), "search": tr.search.state_dict()},
        tmp,
    )
    tmp.replace(weights)
    metrics_path.write_text(json.dumps(tr.metrics, indent=1) + "\n")
    (cdir / "meta.json").write_text(
        json.dumps({"key": key, "seed": seed, "hparams": hp.as_dict(), "created": manifest_mod.utc_now()}, indent=1)
        + "\n"
    )
    log(f"training: done in {tr.metrics['train_seconds']['total_with_eval']} s (incl. evaluation) -> {cdir}")
    return tr


# ---------------------------------------------------------------------------------------- parity inputs


def parity_feeds(ds: data_mod.Dataset, hp: HParams, seed: int, tr: Trained) -> dict[str, dict[str, np.ndarray]]:
    """Held-out requests plus edge cases (unknown/negative/huge ids, empty histories and queries)."""
    tok = load_tokenizer()
    sp = make_split(ds, hp.holdout_days)
    users, hists, excls, _ = retrieval_eval_requests(sp)
    users, hists, excls = users[:90], hists[:90], excls[:90]
    big = np.iinfo(np.int64).max
    edge_h = np.zeros((6, HISTORY_LEN), np.int64)
    edge_h[1, -3:] = [1, 2, 3]
    edge_h[2, -4:] = [-5, ds.n_items + 1, big, 7]
    edge_h[3] = np.arange(1, HISTORY_LEN + 1)
    edge_h[4, -1] = ds.n_items
    edge_x = np.zeros((6, EXCLUDE_LEN), np.int64)
    edge_x[2, :4] = [-1, ds.n_items + 5, big, 7]
    edge_x[3] = np.arange(1, EXCLUDE_LEN + 1)
    edge_u = np.array([0, ds.n_users + 10, -3, big, 1, ds.n_users], np.int64)
    retr = {
        "user_id": np.concatenate([users, edge_u])[:, None].astype(np.int64),
        "history": np.concatenate([hists, edge_h]),
        "exclude": np.concatenate([excls, edge_x]),
    }
    with torch.no_grad():
        cand, _ = RetrievalGraph(tr.retrieval).eval()(
            *(torch.from_numpy(retr[k]) for k in ("user_id", "history", "exclude"))
        )
    rank = {"history": retr["history"], "candidates": cand.numpy()}
    tokens, s_users, _ = search_eval_set(ds, sp, tok, hp, seed)
    queries, _ = lexical_hit_queries(ds, tok, 30, seed + 1)
    q_tok = np.array([tok.encode(q) for q in queries], np.int64)
    edge_t = np.zeros((4, tok.MAX_TOKENS), np.int64)
    edge_t[1, :2] = [big, -7]
    edge_t[2, :3] = q_tok[0, :3]
    edge_t[3, :] = q_tok[1]
    search = {
        "tokens": np.concatenate([tokens[:60], q_tok, edge_t]),
        "user_id": np.concatenate([s_users[:60], np.zeros(30, np.int64), [0, ds.n_users + 3, -1, big]])[:, None],
    }
    return {"retrieval": retr, "ranker": rank, "search_model": search}


# ------------------------------------------------------------------------------------------------ golden


def golden_requests(ds: data_mod.Dataset, hp: HParams, seed: int, catalog: str) -> dict:
    """A dozen request inputs from held-out data (main adds the reference's answers to them as ``expected``)."""
    tok = load_tokenizer()
    sp = make_split(ds, hp.holdout_days)
    rng = np.random.default_rng(seed + 99)
    users = sorted(u for u in sp.test_seq if sp.train_seq.get(u))
    picks = [users[int(k)] for k in rng.choice(len(users), 3, replace=False)]
    longest = max(sp.train_seq, key=lambda u: len(sp.train_seq[u]))
    unknown = ds.n_users + 1000
    rec = [{"name": f"known_user_{u}", "user_id": u, "history": sp.train_seq[u][-60:]} for u in picks]
    rec += [
        {"name": "longest_history", "user_id": longest, "history": sp.train_seq[longest][-EXCLUDE_LEN:]},
        {
            "name": "history_of_1000",
            "user_id": picks[0],
            "history": [int(i) for i in (np.arange(EXCLUDE_LEN) % ds.n_items) + 1],
        },
        {"name": "unknown_user_with_history", "user_id": unknown, "history": sp.train_seq[picks[1]][-20:]},
        {"name": "unknown_user_empty_history", "user_id": 0, "history": []},
        {"name": "known_user_empty_history", "user_id": picks[2], "history": []},
    ]
    buys = sorted(set(sp.test_buys)) or [(picks[0], sp.test_seq[picks[0]][0])]
    bu, bi = buys[int(rng.integers(len(buys)))]
    words = tok.tokenize(ds.titles[bi])
    search = [
        {"name": "bought_item_words", "query": " ".join(words[:3]), "user_id": bu},
        {"name": "bought_item_words_anonymous", "query": " ".join(words[:3]), "user_id": None},
        {"name": "one_word_known_user", "query": words[-2] if len(words) > 1 else words[0], "user_id": bu},
        {
            "name": "mixed_case_punctuation_unknown_words",
            "query": f"{words[0].upper()}, {words[-1].title()}!! zzxqv",
            "user_id": None,
        },
        {"name": "unknown_user", "query": " ".join(words[1:3]) or words[0], "user_id": unknown},
    ]
    return {
        "catalog": catalog,
        "n_users": ds.n_users,
        "n_items": ds.n_items,
        "note": "golden requests (ids are the dense ids of the catalogue/id maps) and, under 'expected', the answers "
        "build/reference.py gave on the versions built: the control plane's fallback when its reference cannot run",
        "recommend": rec,
        "search": search,
    }


# -------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m recserve.build.pipeline",
        description="Build recserve's models: data, training (cached), ONNX export with torch/onnxruntime parity, "
        "TensorRT engines where a GPU exists, and a NEW numbered version of each model with a manifest.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--repository",
        type=Path,
        default=Path("model_repository"),
        help="Triton model repository that receives <model>/<n>/ (existing versions are never touched)",
    )
    p.add_argument(
        "--work-dir",
        type=Path,
        default=Path("artifacts"),
        help="data, training cache, ONNX staging, timing cache and golden.json",
    )
    p.add_argument("--seed", type=int, default=7, help="seed of the synthetic data and of training")
    p.add_argument(
        "--data-csv",
        type=Path,
        default=None,
        help="train on a UserBehavior CSV (user_id,item_id,category_id,behavior_type,timestamp; header "
        "optional) instead of synthetic data; ids are remapped to dense 1..N (maps in work-dir)",
    )
    p.add_argument(
        "--catalog-csv",
        type=Path,
        default=None,
        help="item catalogue CSV (item_id,category_id,title) for --data-csv; without it titles are 'c<category>'",
    )
    p.add_argument("--no-trt", action="store_true", help="skip the TensorRT engines even where a GPU exists")
    a = p.parse_args(argv)
    if a.catalog_csv is not None and a.data_csv is None:
        p.error("--catalog-csv needs --data-csv")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    hp = HParams()
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    try:
        ds, provenance = prepare_data(work, args.seed, args.data_csv, args.catalog_csv)
        check_size(ds)
    except (data_mod.DataError, ValueError, OSError) as e:
        console.print(f"[red]data error:[/red] {e}")
        return 2
    key = cache_key(provenance["files"], args.seed, hp)
    tr = train_or_load(ds, hp, args.seed, key, work / "cache")

    # ONNX export + parity
    stage = work / "export" / key[:16]
    graphs = {
        "retrieval": RetrievalGraph(tr.retrieval).eval(),
        "ranker": RankerGraph(tr.ranker).eval(),
        "search_model": SearchGraph(tr.search).eval(),
    }
    feeds = parity_feeds(ds, hp, args.seed, tr)
    onnx_paths, parities, contracts = {}, {}, {}
    for name in MODELS:
        t = time.perf_counter()
        inputs = export_mod.CONTRACTS[name][0]
        example = tuple(torch.from_numpy(feeds[name][k][:2]) for k in inputs)
        onnx_paths[name] = export_mod.export_onnx(graphs[name], name, example, stage / f"{name}.onnx")
        parities[name] = export_mod.parity(graphs[name], name, onnx_paths[name], feeds[name])
        contracts[name] = export_mod.contract(onnx_paths[name])
        log(
            f"export: {name}.onnx ({onnx_paths[name].stat().st_size / 1e6:.1f} MB, {time.perf_counter() - t:.1f} s); "
            f"parity max|diff| {parities[name].max_abs_diff:.2e}, "
            f"top-K ids identical: {parities[name].topk_ids_identical} -> {'ok' if parities[name].passed else 'FAILED'}"
        )
    failed = [n for n in MODELS if not parities[n].passed]
    if failed:
        console.print(f"[red]parity failed for {', '.join(failed)}; no versions written[/red]")
        return 1

    common = {
        "built_at_utc": manifest_mod.utc_now(),
        "git_commit": manifest_mod.git_commit(REPO_ROOT),
        "git_dirty_build_sources": manifest_mod.git_dirty(
            REPO_ROOT, ["build", str(TOKENIZER_PATH.relative_to(REPO_ROOT))]
        ),
        "runtime_versions": manifest_mod.runtime_versions(),
        "data": provenance,
        "seed": args.seed,
        "training_cache_key": key,
        "hyperparameters": hp.as_dict(),
        "split": tr.metrics.get("split"),
        "train_seconds": tr.metrics.get("train_seconds"),
    }
    metric_of = {"retrieval": "retrieval", "ranker": "ranker", "search_model": "search"}
    written: dict[str, Path] = {}
    for name in MODELS:
        fields = {
            **common,
            "format": "onnx",
            "opset": export_mod.OPSET,
            "contract": contracts[name],
            "metrics": tr.metrics[metric_of[name]],
            "parity": parities[name].as_dict(),
        }
        written[name] = manifest_mod.publish_version(args.repository, name, {"model.onnx": onnx_paths[name]}, fields)

    # TensorRT: where it is available, a failed engine is a failed build (exit code 3), never a silent skip
    trt_line = "TensorRT: skipped (--no-trt); ONNX models built"
    trt_failures: dict[str, str] = {}
    if not args.no_trt:
        ok, why = trt_mod.availability()
        if not ok:
            trt_line = f"TensorRT: skipped ({why}); ONNX models built"
        else:
            trt_line = f"TensorRT: {why}"
            cache = work / "cache" / "trt_timing.cache"
            for name in MODELS:
                ort_out = export_mod.run_ort(export_mod.ort_session(onnx_paths[name]), feeds[name])
                ort_named = dict(zip(export_mod.CONTRACTS[name][1], ort_out, strict=True))
                plan, check, problem = trt_mod.build_checked(
                    name, onnx_paths[name], stage / "trt", cache, feeds[name], ort_named, log
                )
                if problem:
                    trt_failures[name] = problem
                    console.print(f"[red]TensorRT {name}: {problem}; no {name}_trt version written[/red]")
                    continue
                fields = {
                    **common,
                    "format": "tensorrt_plan",
                    "source_onnx_sha256": manifest_mod.sha256_file(onnx_paths[name]),
                    "gpu": trt_mod.cuda_gpus()[0],
                    "contract": contracts[name],
                    "metrics": tr.metrics[metric_of[name]],
                    "precision": check["precision"],
                    "tensorrt_check": check,
                }
                written[f"{name}_trt"] = manifest_mod.publish_version(
                    args.repository, f"{name}_trt", {"model.plan": plan}, fields
                )
    log(trt_line)

    golden = golden_requests(ds, hp, args.seed, provenance["catalog"])
    golden["built_versions"] = {name: int(path.name) for name, path in written.items()}
    # the control plane's documented fallback when its reference cannot run (torch-free: build/reference.py)
    golden["expected"] = reference_mod.record_expectations(golden, reference_mod.Reference.latest(args.repository))
    (work / "golden.json").write_text(json.dumps(golden, indent=1) + "\n")
    spec_golden.write(work / "golden.json", work / "golden")  # the demo spec's golden files (specs/demo.yaml)
    shutil.rmtree(stage, ignore_errors=True)
    summary(tr, parities, written, work / "golden.json", time.perf_counter() - t0)
    if trt_failures:
        console.print(f"[red]TensorRT engines failed: {trt_failures}; the ONNX versions were written[/red]")
        return trt_mod.EXIT_TRT_FAILED
    return 0


def summary(tr: Trained, parities: dict, written: dict[str, Path], golden: Path, seconds: float) -> None:
    m = tr.metrics
    t = Table(title="recserve build: held-out metrics", title_justify="left")
    for col in ("model", "metric", "model value", "baseline(s)", "parity (torch vs onnxruntime)"):
        t.add_column(col)
    r, k, s = m["retrieval"], m["ranker"], m["search"]

    def par(name: str) -> str:
        p = parities[name]
        ids = "" if p.topk_ids_identical is None else f", ids {'same' if p.topk_ids_identical else 'DIFFER'}"
        return f"{'ok' if p.passed else 'FAIL'} (max|diff| {p.max_abs_diff:.1e}{ids})"

    t.add_row(
        "retrieval",
        "recall@50",
        f"{r['recall@50']:.3f} (unknown user: {r['recall@50_as_unknown_user']:.3f})",
        f"popularity {r['baseline_popularity_recall@50']:.3f}",
        par("retrieval"),
    )
    t.add_row(
        "ranker",
        "AUC",
        f"{k['auc']:.3f}",
        f"popularity {k['baseline_popularity_auc']:.3f}, history-category {k['baseline_history_category_auc']:.3f}",
        par("ranker"),
    )
    t.add_row(
        "search_model",
        "recall@50 (1-word)",
        f"{s.get('recall@50', float('nan')):.3f} (lexical hit@10 {s['lexical_hit@10']:.3f})",
        f"popularity {s.get('baseline_popularity_recall@50', float('nan')):.3f}, "
        f"lexical+pop {s.get('baseline_lexical_popularity_recall@50', float('nan')):.3f}",
        par("search_model"),
    )
    console.print(t)
    for name, path in written.items():
        console.print(f"  wrote {name} version {path.name}: {path}")
    console.print(f"  golden requests: {golden}")
    secs = m.get("train_seconds", {})
    cpu = sum(v for k, v in secs.items() if k.endswith("_cpu"))
    console.print(
        f"done in {seconds:.0f} s (training when not cached: {secs.get('total_with_eval', '?')} s wall, "
        f"{cpu:.0f} CPU-s for the three models)"
    )


if __name__ == "__main__":
    sys.exit(main())
