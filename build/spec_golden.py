"""The demo's golden requests as serving-spec golden files (perf_analyzer's ``--input-data`` layout).

The build writes ``artifacts/golden.json`` (recommend and search requests with names); the demo's serving spec
(specs/demo.yaml) reads them as ``artifacts/golden/recommend.json`` and ``artifacts/golden/search.json``: one
request per entry, tensors without the batch dimension, data only (expected answers come from the reference).
An empty history is sent as ``[0]``, as the client does (recommend_pre treats item 0 as padding).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def recommend_data(entries: list[dict]) -> list[dict]:
    out = []
    for e in entries:
        hist = [int(x) for x in e.get("history", [])] or [0]
        out.append({"user_id": {"content": [int(e["user_id"])], "shape": [1]},
                    "history": {"content": hist, "shape": [len(hist)]}})
    return out


def search_data(entries: list[dict]) -> list[dict]:
    out = []
    for e in entries:
        req = {"query": {"content": [str(e["query"])], "shape": [1]}}
        if e.get("user_id") is not None:
            req["user_id"] = {"content": [int(e["user_id"])], "shape": [1]}
        out.append(req)
    return out


def write(golden_json: Path, out_dir: Path) -> list[Path]:
    """Write ``recommend.json`` and ``search.json`` under ``out_dir`` from the build's golden.json."""
    doc = json.loads(Path(golden_json).read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for model, convert in (("recommend", recommend_data), ("search", search_data)):
        path = out_dir / f"{model}.json"
        path.write_text(json.dumps({"data": convert(doc[model])}) + "\n")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recserve.build.spec_golden", description=__doc__.splitlines()[0])
    p.add_argument("--golden", type=Path, default=Path("artifacts/golden.json"), help="the build's golden requests")
    p.add_argument("--out", type=Path, default=Path("artifacts/golden"), help="where the golden files go")
    args = p.parse_args(argv)
    for path in write(args.golden, args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
