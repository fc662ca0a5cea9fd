"""recctl against one real fleet: every --dry-run changes nothing, the docs' examples that need a running fleet
(``<!-- test: fleet -->``) run, and ``recctl status --html`` of that fleet opens in headless Chromium.

One fleet for the module, so the docs cost only the time their commands take: two instances on the small stand-in
models, with a backup policy whose target is a temporary folder (``recctl backup now`` has somewhere to write).
The tests run in file order: the dry runs first (they compare the fleet before and after), then the docs' examples,
which change it as an operator would. Ranker version 2 is written once the fleet is up, as an operator would before
``recctl rollover ranker --version 2``.

The docs' examples run in page order (tests/test_docs.py's order), each in a temporary working folder (``status.html``
lands there, not in the checkout), with ``.venv/bin`` first on PATH, ``RECSERVE_ROOT`` naming the fleet, and the
documented client addresses ``localhost:8001`` (gRPC) and ``localhost:8000`` (HTTP) replaced by the fleet's ports;
nothing else of an example is changed, and each must exit 0. The fleet is stopped (by pid) even when a test fails.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
import yaml

from recserve.control.runtime.triton import REPO_ROOT, free_port
from tests.fleet_fixtures import make_version, running_fleet
from tests.test_docs import FLEET, _env
from tests.test_report_html import open_in_chromium


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    base = tmp_path_factory.mktemp("recctl-fleet")
    policy = base / "backup-policy.yaml"
    policy.write_text(yaml.safe_dump({"schedule": {"every_hours": 24, "after_rollover": False},
                                      "target": {"path": str(base / "backups")}}))
    with running_fleet(base / "fleet", up_args=("--backup-policy", str(policy))) as f:
        # the first scheduled backup (none at the target yet) is done before the tests compare anything
        deadline = time.monotonic() + 120
        while not json.loads(f.recctl("backup", "list", "-o", "json").stdout):
            assert time.monotonic() < deadline, "no first backup after 120 s"
            time.sleep(0.5)
        make_version(f.repository, "ranker")  # the version the docs roll to
        yield f


# ---------------------------------------------------------------------------------------------- --dry-run
def test_dry_runs_against_a_real_fleet_change_nothing(fleet):
    """-o json/yaml of status agree, and every --dry-run leaves the instances, pids, desired versions, knee,
    snapshots and backups as they were."""
    f = fleet

    def state() -> tuple:
        st = f.status()
        return (sorted((i["id"], i["role"], i["pid"]) for i in st["instances"]), st["desired"], st["knee_rps"],
                f.recctl("snapshots", "-o", "json").stdout)

    before = state()
    as_yaml = yaml.safe_load(f.recctl("status", "-o", "yaml").stdout)
    assert as_yaml["desired"] == before[1] and as_yaml["endpoints"]["grpc"] == f.grpc_url
    last = json.loads(f.recctl("status", "--json").stdout)["instances"][-1]["id"]
    current = before[1]["ranker"][0]
    refused = f.recctl("rollover", "ranker", "--version", str(current), "--dry-run", "-o", "json", check=False)
    assert refused.returncode == 1 and "already at version" in json.loads(refused.stdout)["refused"][0]
    for argv in (["scale", "--active", "1"], ["instances", "remove", last], ["instances", "add"],
                 ["promote", last], ["drain", last], ["limits", "--knee-rps", "123"], ["snapshot"],
                 ["backup", "now"], ["down"], ["up", "--repository", str(f.repository)]):
        r = f.recctl(*argv, "--dry-run", "-o", "json")
        assert json.loads(r.stdout)["dry_run"] is True, argv
    up = json.loads(f.recctl("up", "--repository", str(f.repository), "-o", "json").stdout)
    assert up["already_up"] is True and up["pid"] == f.control_pid()
    assert state() == before


# ---------------------------------------------------------------------------------------------- the docs
def _run(code: str, lang: str, fleet, cwd) -> subprocess.CompletedProcess:
    code = code.replace("localhost:8001", fleet.grpc_url).replace("localhost:8000", fleet.http_url)
    cmd = [sys.executable, "-c", code] if lang in ("python", "py") else ["bash", "-e", "-o", "pipefail", "-c", code]
    env = _env() | {"RECSERVE_ROOT": str(fleet.root)}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("ex", FLEET, ids=lambda e: e.where)
def test_docs_fleet_example_runs(ex, fleet, tmp_path):
    out = _run(ex.code, ex.lang, fleet, tmp_path)
    assert out.returncode == 0, (f"{ex.where} exited {out.returncode}\n{ex.code}\n"
                                 f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    assert "Traceback" not in out.stderr, out.stderr[-3000:]


# ---------------------------------------------------------------------------------------------- the status page
def test_status_page_of_a_real_fleet_renders_in_chromium(fleet, tmp_path):
    """``recctl status --html FILE``: the -o document still on stdout; the page (control/htmlpage.py) runs and
    fetches nothing; Chromium shows the fleet's health, every instance with its role, state, pid and versions, the
    endpoints and the recent events."""
    page = tmp_path / "status.html"
    r = fleet.recctl("status", "--html", str(page), "--events", "20", "-o", "json")
    doc = json.loads(r.stdout)
    assert f"status page written to {page}" in " ".join(r.stderr.split())
    text = page.read_text(encoding="utf-8")
    # the endpoints are text (http://127.0.0.1:.../metrics); nothing is loaded from anywhere
    assert "<script" not in text.lower() and "<link" not in text.lower() and not re.search(r'\b(src|href)="', text)
    dom = open_in_chromium(page, tmp_path)
    (h1,) = dom.all("h1")
    assert h1["text"].strip() == f"recserve fleet {doc['health']}"
    ids = tuple(i["id"] for i in doc["instances"])
    rows = [tr["text"] for tr in dom.all("tr") if tr["text"].startswith(ids)]
    assert len(rows) == len(doc["instances"]) >= 2, rows
    for inst, row in zip(doc["instances"], rows, strict=True):
        assert row.startswith(inst["id"] + inst["role"] + inst["state"] + str(inst["pid"])), (inst, row)
        assert f"ranker:{doc['desired']['ranker'][0]}" in row, row
    body = "".join(dom.text)
    assert f"gRPC {fleet.grpc_url}" in body and "desired versions" in body
    (events,) = [t for t in dom.all("table") if t["attrs"].get("class") == "events"]
    assert doc["events"] and all(e["message"][:40] in events["text"] for e in doc["events"])
    assert not dom.all("img")


def test_status_html_without_a_fleet_writes_nothing_and_exits_3(tmp_path):
    page = tmp_path / "status.html"
    r = subprocess.run([sys.executable, "-m", "recserve.control.recctl", "--root", str(tmp_path), "--control",
                        f"127.0.0.1:{free_port()}", "--timeout", "5", "status", "--html", str(page)],
                       capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert r.returncode == 3 and r.stdout == "" and not page.exists(), r
