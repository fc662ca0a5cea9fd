"""report.html of drill and perf runs and the ``recctl status`` page, opened in headless Chromium (Debian's
``chromium``, installed by ``make setup``): the page renders, shows every drill with its verdict, and every plot
decodes. Run dirs are made from hand-made results, as in test_drills_report.py: no fleet, no server.

How a page is checked: a copy gets a small probe script (allowed by its hash in the page's Content-Security-Policy,
which otherwise forbids every script) that writes each image's decoded size into the DOM; Chromium's ``--dump-dom``
prints the DOM after the load event, and Python's html.parser reads it back.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import struct
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from recserve.control import htmlpage
from recserve.drills.journal import Journal
from recserve.drills.probe import Record
from recserve.drills.report import new_run_dir, write
from recserve.drills.timeline import per_second
from recserve.perf import report as perf_report

HOSTILE = "<img src=x onerror=\"document.title='pwned'\"><script>document.title='pwned'</script> & \"q\""
#: A drill name is a file name too (its journal): the hostile one has no slash.
HOSTILE_NAME = "crash<img src=x onerror=\"document.title='pwned'\">&'q'"

PROBE = ("window.addEventListener('load', () => { for (const i of document.images) "
         "{ i.dataset.decoded = i.complete ? i.naturalWidth + 'x' + i.naturalHeight : 'no'; } "
         "document.body.dataset.probe = 'done'; });")


# ---------------------------------------------------------------------------------------------- Chromium
def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        pytest.skip("chromium not installed (Debian: apt-get install chromium; make setup installs it)")
    return exe


class Dom(HTMLParser):
    """What a test needs from a dumped DOM: elements with their attributes and text, and all the text."""

    def __init__(self, text: str):
        super().__init__()
        self.elements: list[dict] = []  # {"tag", "attrs", "text"}
        self._open: list[dict] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        el = {"tag": tag, "attrs": dict(attrs), "text": ""}
        self.elements.append(el)
        if tag not in ("img", "meta", "br", "hr", "link", "input"):
            self._open.append(el)

    def handle_endtag(self, tag):
        while self._open:
            if self._open.pop()["tag"] == tag:
                break

    def handle_data(self, data):
        self.text.append(data)
        for el in self._open:
            el["text"] += data

    def all(self, tag: str) -> list[dict]:
        return [e for e in self.elements if e["tag"] == tag]


def open_in_chromium(page: Path, tmp_path: Path) -> Dom:
    """The DOM of ``page`` after Chromium loaded it, with the probe's marks."""
    exe = _chromium()
    text = page.read_text(encoding="utf-8")
    digest = base64.b64encode(hashlib.sha256(PROBE.encode()).digest()).decode()
    assert htmlpage.CSP in text, "the page carries its Content-Security-Policy"
    probed = (text.replace(htmlpage.CSP, f"{htmlpage.CSP}; script-src 'sha256-{digest}'")
              .replace("</body>", f"<script>{PROBE}</script>\n</body>"))
    copy = tmp_path / f"probed-{page.name}"
    copy.write_text(probed, encoding="utf-8")
    out = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          f"--user-data-dir={tmp_path / 'chromium-profile'}", "--run-all-compositor-stages-before-draw",
                          "--virtual-time-budget=10000", "--dump-dom", copy.as_uri()],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0 and "<body" in out.stdout, out.stderr[-2000:]
    dom = Dom(out.stdout)
    (body,) = dom.all("body")
    assert body["attrs"].get("data-probe") == "done", "the page did not finish loading"
    return dom


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def assert_plots_decoded(dom: Dom, expected: list[Path]) -> None:
    """Every <img> is an inline PNG that Chromium decoded to the size of the PNG it came from."""
    imgs = dom.all("img")
    assert len(imgs) == len(expected), [i["attrs"].get("alt") for i in imgs]
    for img, png in zip(imgs, expected, strict=True):
        src = img["attrs"]["src"]
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]) == png.read_bytes()
        w, h = png_size(png.read_bytes())
        assert img["attrs"].get("data-decoded") == f"{w}x{h}", (img["attrs"].get("alt"), w, h)


def assert_self_contained(text: str) -> None:
    """No script, nothing fetched: the page travels alone and runs nothing."""
    assert "<script" not in text.lower() and "http://" not in text and "https://" not in text
    assert 'src="' not in text.replace('src="data:image/png;base64,', "")


# ---------------------------------------------------------------------------------------------- drills
def drill(name: str, passed: bool | None = True, **kw) -> dict:
    d = {"name": name, "passed": passed, "status": "completed", "reason": "all 2 expectations met", "rto_ms": 400.0,
         "detection_ms": 350.0, "failed_requests": 0, "total_requests": 320, "wrong_answers": 0,
         "p99_ms": {"before": 12.5, "during": 240.0, "after": 13.0}, "versions_consistent": True,
         "tail": {"p999_ms": 512.3, "over_4x_slo": 2, "limit_ms": 1000.0, "requests": 320},
         "checks": [{"expectation": "failed_requests_max", "figure": "failed_requests", "measured": 0,
                     "target": "<= 0", "ok": True, "missed_by": None, "deterministic": True}]}
    d.update(kw)
    return d


def timed(name: str, t0: float, **kw) -> dict:
    recs = [Record(i, "recommend", t0 + i * 0.1, 10.0 + i % 7, "OK", True) for i in range(40)]
    return drill(name, seconds=per_second(recs, t0, t0 + 4.0), fault_at_s=1.0, fault_end_s=2.0,
                 marks=[(1.3, "detected")], slo_p99_ms=50.0, **kw)


@pytest.fixture(scope="module")
def drill_run(tmp_path_factory):
    """A run dir with four drills: a pass and a fail with plots, a skip and a hostile-named fail without."""
    run = new_run_dir(tmp_path_factory.mktemp("drills"))
    failing = timed("hang", 200.0, passed=False, reason="failed_requests 2 vs <= 0 (missed by 2)",
                    failed_requests=2, checks=[
                        {"expectation": "failed_requests_max", "figure": "failed_requests", "measured": 2,
                         "target": "<= 0", "ok": False, "missed_by": "2", "deterministic": True},
                        {"expectation": "rto_ms_max", "figure": "rto_ms", "measured": 400.0, "target": "<= 5000",
                         "ok": True, "missed_by": None, "deterministic": False}],
                    failures=[{"status": "UNAVAILABLE", "detail": "<b>connection</b> refused & reset", "count": 2,
                               "first_at_s": 1.5, "first_after_fault_s": 0.5, "first_latency_ms": 3.1}])
    drills = [timed("crash", 100.0), failing,
              drill("network-partition", None, status="skipped", reason="no ip netns here", checks=[], tail=None),
              drill(HOSTILE_NAME, False, reason=f"reason with {HOSTILE}", checks=[])]
    journals = {d["name"]: Journal(d["name"], started_at=float(i)) for i, d in enumerate(drills)}
    paths = write(run, drills, journals, {}, {"models": "ranker:1", "fleet": "private"})
    return run, paths


def test_drill_report_html_is_written_self_contained_and_escaped(drill_run):
    """Without a browser: report.html sits next to report.md, runs nothing, fetches nothing, escapes the data."""
    run, paths = drill_run
    text = paths["html"].read_text(encoding="utf-8")
    assert paths["html"] == run / "report.html"
    assert_self_contained(text)
    assert HOSTILE not in text and HOSTILE_NAME not in text
    assert "&lt;b&gt;connection&lt;/b&gt; refused &amp; reset" in text
    assert text.count('<section class="drill"') == 4


def test_drill_report_renders_in_chromium_with_every_drill_and_plot(drill_run, tmp_path):
    run, _ = drill_run
    dom = open_in_chromium(run / "report.html", tmp_path)
    names = ["crash", "hang", "network-partition", HOSTILE_NAME]
    verdicts = ["PASS", "FAIL", "SKIP", "FAIL"]
    # every drill's section: its name (as text, also the hostile one) and its verdict
    titles = [h["text"].strip() for h in dom.all("h2") if h["text"].strip() != "Definitions"]
    assert titles == [f"{n} {v}" for n, v in zip(names, verdicts, strict=True)], titles
    reasons = [s["text"] for s in dom.all("span") if s["attrs"].get("class") == "reason"]
    assert reasons[1] == "failed_requests 2 vs <= 0 (missed by 2)" and reasons[3] == f"reason with {HOSTILE}"
    # the summary table: one row per drill, linked to its section, coloured by verdict, with the tail column
    (summary,) = [t for t in dom.all("table") if t["attrs"].get("class") == "summary"]
    assert "p99.9 ms / over 4x SLO" in summary["text"] and "512 / 2" in summary["text"]
    rows = [tr for tr in dom.all("tr") if tr["attrs"].get("class") in ("good", "bad", "warn")][:4]
    assert [r["attrs"]["class"] for r in rows] == ["good", "bad", "warn", "bad"]
    assert [a["attrs"]["href"] for a in dom.all("a")] == [f"#drill-{i}" for i in range(4)]
    assert [s["attrs"]["id"] for s in dom.all("section")] == [f"drill-{i}" for i in range(4)]
    # the missed check is highlighted, the met one is not; the failure message is text, not markup
    missed = [tr["text"] for tr in dom.all("tr") if tr["attrs"].get("class") == "bad" and "failed_requests_max"
              in tr["text"]]
    assert len(missed) == 1 and "deterministic" in missed[0]
    assert "<b>connection</b> refused & reset" in "".join(dom.text)
    assert not [b for b in dom.all("b") if b["text"] == "connection"]
    assert not dom.all("script")[:-1], "only the test's probe script is in the page"
    # the two timelines decoded in the browser, in drill order
    assert_plots_decoded(dom, [run / "crash.png", run / "hang.png"])


def test_drill_report_cli_rerenders_report_html(drill_run):
    """python -m recserve.drills report DIR brings report.html back from the journals (exit 1: drills failed)."""
    from recserve.drills.cli import main

    run, _ = drill_run
    before = (run / "report.html").read_text(encoding="utf-8")
    (run / "report.html").unlink()
    assert main(["report", str(run)]) == 1
    assert (run / "report.html").read_text(encoding="utf-8") == before


# ---------------------------------------------------------------------------------------------- perf
def perf_doc() -> dict:
    run = {"target": "recommend", "model": "recommend", "via": "direct", "mode": "concurrency",
           "variant": "committed", "batch_size": 1, "infer_per_sec": 300.0, "p50_ms": 5.0, "p90_ms": 9.0,
           "p99_ms": 12.0, "p999_ms": 40.0, "over_4x_slo": 0, "requests": 900,
           "server": {"recommend": {"queue_us": 3.0, "compute_infer_us": 2000.0, "avg_batch": 1.0}},
           "rss_mib": {"server_mib": 45.0, "stubs_mib": 320.0, "stub_count": 6}, "error": None}
    return {"suite": "t", "started": "s", "finished": "f", "slo_ms": 50, "versions": {"server": "2.51.0"},
            "ratios": {"served_vs_inprocess": {"value": 0.8, "target": 0.7, "meets_target": True},
                       "haproxy_vs_direct": {"value": 0.85, "target": 0.9, "meets_target": False},
                       "trt_vs_onnx": {"value": None, "skipped": "no NVIDIA GPU / TensorRT on this host"}},
            "capacity": {"recommend": {"model": "recommend", "via": "direct", "capacity_rps": 300.0,
                                       "p99_ms_at_capacity": 20.0, "reason": "next rate 350/s failed"}},
            "runs": [dict(run, value=1), dict(run, value=4, infer_per_sec=350.0, p99_ms=30.0),
                     dict(run, target="search", model="search", value=1, infer_per_sec=90.0),
                     dict(run, value=8, error="perf_analyzer failed (exit 99): <boom>")],
            "errors": ["recommend [committed, direct, concurrency 8]: <boom>"], "skipped": []}


def test_perf_report_html_renders_in_chromium(tmp_path):
    out = tmp_path / "run"
    paths = perf_report.write(perf_doc(), out)
    text = paths["html"].read_text(encoding="utf-8")
    assert paths["html"] == out / "report.html"
    assert_self_contained(text)
    dom = open_in_chromium(paths["html"], tmp_path)
    body = "".join(dom.text)
    assert "recserve perf report: suite t" in body and "<boom>" in body
    heads = [h["text"] for h in dom.all("h2")]
    assert heads[:3] == ["Ratios (measured side by side in this run)",
                         "Capacity (highest request rate with p99 under the SLO)", "Load points"]
    bad = [tr["text"] for tr in dom.all("tr") if tr["attrs"].get("class") == "bad"]
    assert any("haproxy_vs_direct" in t and "MISSED" in t for t in bad) and any("error" in t for t in bad)
    assert any(th["text"] == "p99.9 ms" for th in dom.all("th"))
    assert_plots_decoded(dom, [out / "recommend.png", out / "search.png"])


# ---------------------------------------------------------------------------------------------- recctl status
def status_doc() -> dict:
    """What ``recctl status -o json`` prints: recctl's own conversion of a FleetStatus, plus monitoring."""
    from recserve.control.api.proto import control_pb2 as pb
    from recserve.control.api.recctl import _status_dict

    st = pb.FleetStatus(
        endpoints=pb.Endpoints(grpc="127.0.0.1:8001", http="127.0.0.1:8000", control="127.0.0.1:50051",
                               metrics="127.0.0.1:9108"),
        health="degraded", warnings=["instance i1 is broken: <not answering>"], route="pool", mode="active-active",
        active_target=2, knee_rps=850.0, knee_source="recctl limits", host_limit=43,
        desired={"ranker": pb.Versions(versions=[2])},
        instances=[pb.Instance(id="i0", role="active", state="healthy", pid=101, grpc_port=9001, http_port=9000,
                               weight=100, models={"ranker": pb.Versions(versions=[2]),
                                                   "ranker_pre": pb.Versions(versions=[1])}, limit=21, in_flight=3),
                   pb.Instance(id="i1", role="active", state="broken", pid=102, grpc_port=9011, http_port=9010,
                               detail="health: <deadline exceeded>", restarts=1, limit=21)],
        events=[pb.Event(ts_unix=1_700_000_000.25, kind="detected", instance="i1",
                         message="i1 broken: <deadline exceeded> & restarting")],
        active_rollout=pb.Rollout(id="r7", model="ranker", from_version=1, to_version=2, phase="bake",
                                  status="running", strategy="canary", canary="i0"))
    return {**_status_dict(st), "monitoring": None}


def test_status_page_from_recctl_json_renders_in_chromium(tmp_path):
    """recctl status -o json | python -m recserve.control.api.statushtml > status.html, opened in Chromium."""
    out = subprocess.run([sys.executable, "-m", "recserve.control.api.statushtml"], input=json.dumps(status_doc()),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert_self_contained(out.stdout)
    page = tmp_path / "status.html"
    page.write_text(out.stdout, encoding="utf-8")
    dom = open_in_chromium(page, tmp_path)
    (h1,) = dom.all("h1")
    assert h1["text"].strip() == "recserve fleet degraded"
    body = "".join(dom.text)
    for text in ("instance i1 is broken: <not answering>", "health: <deadline exceeded>",
                 "i1 broken: <deadline exceeded> & restarting", "2023-11-14 22:13:20.250Z",
                 "rollout r7: ranker 1 -> 2 (canary) phase bake", "host limit 43"):
        assert text in body, text
    (instances,) = [t for t in dom.all("table") if t["attrs"].get("class") == "instances"]
    rows = [tr for tr in dom.all("tr") if tr["text"].startswith(("i0", "i1"))]
    assert [(r["text"][:2], r["attrs"].get("class")) for r in rows] == [("i0", None), ("i1", "bad")]
    assert "ranker:2" in rows[0]["text"] and "ranker_pre" not in instances["text"]
    assert not dom.all("img")


def test_statushtml_refuses_what_is_not_a_status_document(tmp_path):
    out = subprocess.run([sys.executable, "-m", "recserve.control.api.statushtml"], input='{"drills": []}',
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "not a `recctl status -o json` document" in out.stderr and not out.stdout
