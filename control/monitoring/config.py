"""Runtime copies of deploy/monitoring/*.yml: the committed files keep the production defaults, a runtime copy
only points paths and ports at one fleet (and, for drills, shortens intervals to 1 s).

The committed rules and dashboard name the demo's client-facing models (``model=~"recommend|search"``). A fleet
serving a spec's models (``recctl up --spec``) publishes their names in ``<root>/monitoring/models.json``
(``publish_models``, written by the control plane at start); ``make monitor-up`` then renders runtime copies of the
rule files and the dashboard that select those models instead (``write_runtime_rules``, ``render_dashboard``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from recserve.control.runtime.triton import REPO_ROOT

DEPLOY_DIR = REPO_ROOT / "deploy" / "monitoring"
#: Drills: scrape and evaluate every second, notify without batching (the `for` durations stay as committed).
FAST = {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "900ms"}
FAST_ROUTE = {"group_wait": "0s", "group_interval": "1s"}
#: The client-facing models the committed rules and dashboard select (the demo's ensembles), and their selector.
DEMO_MODELS = ("recommend", "search")
DEMO_SELECTOR = 'model=~"recommend|search"'
#: Model names a runtime selector may hold: what Triton's repository and the front door's allow-list accept.
MODEL_NAME = re.compile(r"[A-Za-z0-9_.-]+")
MODELS_FILE = "models.json"
DASHBOARD = "grafana-dashboard.json"
#: Runtime rule files keep each expression's lines whole (YAML's default 80 columns would fold them mid-selector).
RULES_WIDTH = 4096


def rule_files(deploy_dir: Path = DEPLOY_DIR) -> list[Path]:
    return sorted((deploy_dir / "rules").glob("*.yml"))


def alert_names(deploy_dir: Path = DEPLOY_DIR) -> set[str]:
    """Every alert defined in the committed rule files (drill specs may only expect these)."""
    names = set()
    for f in rule_files(deploy_dir):
        for group in (yaml.safe_load(f.read_text()) or {}).get("groups", []):
            names.update(r["alert"] for r in group.get("rules", []) if "alert" in r)
    return names


# ------------------------------------------------------------------ the fleet's models in rules and dashboard
def models_path(root: Path) -> Path:
    return Path(root) / "monitoring" / MODELS_FILE


def publish_models(root: Path, models: list[str] | None, spec: Path | None = None) -> Path | None:
    """Write the fleet's client-facing models for ``make monitor-up`` (``None``: the demo's, which the committed
    rules already name; a stale file of an earlier spec fleet is removed). Returns the file written, if any."""
    path = models_path(root)
    if models is None:
        path.unlink(missing_ok=True)
        return None
    model_selector(models)  # refuse a name the rules could not select, before anything reads it
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"models": list(models), "spec": str(spec) if spec else None}, indent=2))
    tmp.replace(path)
    return path


def published_models(root: Path) -> list[str] | None:
    """The models a spec fleet published (``publish_models``); None when it serves the demo's or published none."""
    try:
        doc = json.loads(models_path(root).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{models_path(root)}: unreadable ({exc}); restart the control plane to rewrite it") from None
    models = doc.get("models") if isinstance(doc, dict) else None
    if not isinstance(models, list) or not models or not all(isinstance(m, str) for m in models):
        raise ValueError(f"{models_path(root)}: 'models' must be a non-empty list of model names")
    return models


def model_selector(models: list[str] | tuple[str, ...]) -> str:
    """``model=~"a|b"`` for PromQL: the names in order, a dot escaped (``\\\\.`` in a PromQL string)."""
    if not models:
        raise ValueError("a model selector needs at least one model")
    bad = [m for m in models if not MODEL_NAME.fullmatch(m)]
    if bad:
        raise ValueError(f"model name {bad[0]!r} cannot be selected in the rules (names match [A-Za-z0-9_.-]+)")
    return 'model=~"' + "|".join(m.replace(".", "\\\\.") for m in models) + '"'


def render_rules(models: list[str] | tuple[str, ...], deploy_dir: Path = DEPLOY_DIR) -> dict[str, dict]:
    """Every committed rule file with the demo's model selector replaced by ``models``' (file name -> rules).
    Only expressions change; every file that names the demo's models must still do so in the committed form."""
    selector = model_selector(models)
    out = {}
    for f in rule_files(deploy_dir):
        cfg = yaml.safe_load(f.read_text())
        seen = False
        for group in cfg.get("groups", []):
            for rule in group.get("rules", []):
                if DEMO_SELECTOR in rule.get("expr", ""):
                    rule["expr"] = rule["expr"].replace(DEMO_SELECTOR, selector)
                    seen = True
        if not seen and "recommend" in f.read_text():
            raise ValueError(f"{f}: names the demo's models but not as {DEMO_SELECTOR}; update "
                             "control/monitoring/config.py")
        out[f.name] = cfg
    return out


def write_runtime_rules(dest: Path, models: list[str] | tuple[str, ...], deploy_dir: Path = DEPLOY_DIR) -> list[Path]:
    """Write ``render_rules`` under ``dest``; the paths, for prometheus.yml's ``rule_files``."""
    rendered = render_rules(models, deploy_dir)
    return [write_yaml(Path(dest) / name, cfg, width=RULES_WIDTH) for name, cfg in rendered.items()]


def render_dashboard(models: list[str] | tuple[str, ...], deploy_dir: Path = DEPLOY_DIR) -> dict:
    """The committed Grafana dashboard with its queries selecting ``models`` instead of the demo's."""
    dash = json.loads((deploy_dir / DASHBOARD).read_text())
    selector, seen = model_selector(models), False
    for panel in dash.get("panels", []):
        for target in panel.get("targets", []):
            if DEMO_SELECTOR in target.get("expr", ""):
                target["expr"] = target["expr"].replace(DEMO_SELECTOR, selector)
                seen = True
    if not seen:
        raise ValueError(f"{deploy_dir / DASHBOARD}: no {DEMO_SELECTOR} in any query: the committed dashboard "
                         "changed; update control/monitoring/config.py")
    return dash


def render_prometheus(targets_dir: Path, alertmanager: str, fast: bool = False,
                      deploy_dir: Path = DEPLOY_DIR, rules: list[Path] | None = None) -> dict:
    """prometheus.yml for one fleet: absolute rule and file_sd paths, that fleet's Alertmanager; ``rules``: runtime
    rule files (``write_runtime_rules``) instead of the committed ones."""
    cfg = yaml.safe_load((deploy_dir / "prometheus.yml").read_text())
    if fast:
        cfg["global"].update(FAST)
    cfg["rule_files"] = [str(p) for p in (rules if rules is not None else rule_files(deploy_dir))]
    cfg["alerting"]["alertmanagers"] = [{"static_configs": [{"targets": [alertmanager]}]}]
    for job in cfg["scrape_configs"]:
        for sd in job.get("file_sd_configs", []):
            sd["files"] = [str(targets_dir / Path(f).name) for f in sd["files"]]
            if fast:
                sd["refresh_interval"] = "1s"
    return cfg


def render_alertmanager(receiver: str, fast: bool = False, deploy_dir: Path = DEPLOY_DIR) -> dict:
    """alertmanager.yml with every webhook pointed at ``receiver`` (host:port); the path keeps the receiver name."""
    cfg = yaml.safe_load((deploy_dir / "alertmanager.yml").read_text())
    for r in cfg["receivers"]:
        for hook in r.get("webhook_configs", []):
            hook["url"] = re.sub(r"^http://[^/]+", f"http://{receiver}", hook["url"])
    if fast:
        cfg["route"].update(FAST_ROUTE)
        for sub in cfg["route"].get("routes", []):
            sub.update({k: v for k, v in FAST_ROUTE.items() if k in sub or k == "group_interval"})
    return cfg


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (rule expressions) as literal blocks, readable as in the committed files."""


_BlockDumper.add_representer(str, lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", v,
                                                                    style="|" if "\n" in v else None))


def write_yaml(path: Path, cfg: dict, width: int = 80) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# generated by control/monitoring/config.py from deploy/monitoring; edits are overwritten\n"
                    + yaml.dump(cfg, Dumper=_BlockDumper, sort_keys=False, width=width))
    return path
