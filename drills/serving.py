"""Drills on a user's Triton repository: what the drills send, judge and roll come from its serving spec.

Why one module: the demo's drills know two ensembles (``recommend``/``search``) and their item-id answers; with a
serving spec (``python -m recserve.drills smoke --spec SPEC``) the probe sends the spec's golden requests, wrong
answers are judged by the spec's comparison rules against the reference outside Triton for the versions the fleet
must serve (``control/spec/reference.py``, never the fleet's own answers), perf_analyzer gets the golden requests as
``--input-data`` (data only), and the faults that roll a model take it from the spec (or ``--roll-model``). Faults
that still know only the demo refuse by name (``REFUSED``) instead of running against models that are not there.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from recserve.control.fleet.spec_golden import batched, unbatched
from recserve.control.spec.compare import compare_answer
from recserve.control.spec.spec import ServingSpec

Answer = dict[str, np.ndarray]

#: Faults a serving spec's fleet cannot take yet, and why (the drill is refused with this line, never run).
REFUSED = {
    "gpu-lost": "its fault switch lives in recserve's own onnxruntime backend and names the demo's models "
                "(retrieval, ranker, search_model)",
    "lost-host": "its private fleet and answer checks are the demo's (recommend/search, artifacts/golden.json)",
    "network-partition": "its private data path (drills/partition.py) loads the demo's recommend/search",
    "security-attacks": "its attack catalogue (drills/attacks.py) sends the demo's recommend/search requests",
    "control-plane-crash": "not checked on a user's repository yet (its restart passes no --spec)",
    "artifact-corruption": "not checked on a user's repository yet",
    "scale": "not checked on a user's repository yet",
    "proxy-crash": "not checked on a user's repository yet",
}
#: Faults that roll a model: their ``model`` parameter is the spec's roll model.
ROLLING = ("rollover-under-load", "bad-rollover", "artifact-corruption", "control-plane-crash", "lost-host")


@dataclass(frozen=True)
class SpecCase:
    """One golden request of a spec model, as the probe sends it (batch dimension added when the model batches)."""

    model: str
    index: int  # which golden request of the model
    inputs: dict[str, np.ndarray] = field(compare=False, hash=False)
    datatypes: dict[str, str] = field(compare=False, hash=False)
    outputs: tuple[str, ...] = ()
    #: the model batches: the answer's batch dimension of 1 is dropped before it is judged
    spec_batched: bool = False


def cases(spec: ServingSpec, models: Sequence[str] | None = None) -> list[SpecCase]:
    """Every golden request of ``models`` (default: all the spec's), interleaved across models."""
    names = list(models or spec.models)
    out, i = [], 0
    longest = max(len(spec.models[n].golden) for n in names)
    for i in range(longest):
        for n in names:
            m = spec.models[n]
            if i < len(m.golden):
                out.append(SpecCase(n, i, batched(m, m.golden[i].inputs), {t.name: t.datatype for t in m.info.inputs},
                                    tuple(m.outputs), m.info.max_batch_size > 0))
    return out


# ---------------------------------------------------------------------------------------------- the spec's fleet
def onnx_steps(spec: ServingSpec) -> list[str]:
    """ONNX steps a rollover drill may roll, best first: those behind a drift-gated model (the step nearest the
    output first), then the others."""
    from recserve.control.spec.repository import read_repository

    models = read_repository(spec.repository)
    gated = [n for n, m in spec.models.items() if m.gates.drift is not None]
    out: list[str] = []
    for n in gated + [n for n in spec.models if n not in gated]:
        for s in reversed(spec.models[n].steps):
            if models[s].kind == "onnx" and models[s].versions and s not in out:
                out.append(s)
    return out


def roll_model(spec: ServingSpec, given: str | None = None) -> tuple[str | None, str]:
    """(model the rolling faults roll, why that one); (None, why not) when the spec has none to roll."""
    from recserve.control.spec.repository import read_repository

    models = read_repository(spec.repository)
    if given:
        users = [n for n, m in spec.models.items() if given in m.steps]
        if given not in models:
            return None, f"--roll-model {given}: no such model in {spec.repository}"
        if not users:
            return None, f"--roll-model {given}: no model of the spec uses it ({', '.join(spec.models)})"
        if models[given].kind == "ensemble":
            return None, f"--roll-model {given}: an ensemble has no files of its own to roll; name one of its steps"
        return given, "--roll-model"
    steps = onnx_steps(spec)
    if not steps:
        return None, "no ONNX step with a built version among the spec's models: name one with --roll-model"
    return steps[0], "the spec's first ONNX step behind a drift-gated model (nearest its output)"


def targets(spec: ServingSpec, model: str | None) -> list[str]:
    """The spec models a drill sends: those that use ``model`` (a rolling drill), else all of them."""
    if model:
        users = [n for n, m in spec.models.items() if model in m.steps]
        if users:
            return users
    return list(spec.models)


def adapt(drill, spec: ServingSpec, model: str | None):
    """The drill spec with the serving spec's models: targets, background model and the rolled model."""
    rolling = [a for a in drill.method if a.fault in ROLLING]
    names = targets(spec, model if rolling else None)
    method = tuple(dataclasses.replace(a, params={**a.params, "model": model}) if a.fault in ROLLING and model
                   else a for a in drill.method)
    load = drill.load
    if load.background is not None:
        bg_model = max(names, key=lambda n: len(spec.models[n].steps))  # the longest pipeline: most to lose
        load = dataclasses.replace(load, background=dataclasses.replace(load.background, model=bg_model))
    return dataclasses.replace(drill, targets=type(drill.targets)(names), method=type(drill.method)(method),
                               load=load)


def refusal(drill, spec: ServingSpec, model: str | None, model_why: str) -> str | None:
    """Why this drill cannot run on the spec's fleet (it is then skipped with this line), or None."""
    for a in drill.method:
        if a.fault in REFUSED:
            return f"{a.fault} on a serving spec's repository: {REFUSED[a.fault]}"
        if a.fault in ROLLING and model is None:
            return f"{a.fault} needs a model to roll: {model_why}"
    return None


def data_only(spec: ServingSpec, model: str, path: Path) -> Path:
    """perf_analyzer ``--input-data``: the model's golden file without ``validation_data`` (perf_analyzer would
    compare it exactly; recserve judges answers itself, by the spec's rules)."""
    doc = json.loads(spec.models[model].golden_file.read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"data": doc["data"]}))
    return path


# ---------------------------------------------------------------------------------------------- answers
def ask(client, spec: ServingSpec, model: str, index: int = 0) -> Answer:
    """One golden request of ``model`` through ``RecClient.infer`` (unbatched answer)."""
    m = spec.models[model]
    types = {t.name: t.datatype for t in m.info.inputs}
    return unbatched(m, client.infer(model, batched(m, m.golden[index].inputs), types, list(m.outputs)))


def differs(spec: ServingSpec, model: str, got: Answer, want: Answer) -> str:
    """'' when ``got`` passes ``want`` under the spec's rules for ``model``; else why not."""
    diff = compare_answer(spec.models[model].outputs, got, want)
    return "; ".join(f"{model}.{o}: {why}" for o, why in diff.items())


def instance_answers(fleet, spec: ServingSpec, models: Sequence[str]) -> tuple[dict, list[str]]:
    """Every healthy instance asked directly (first golden request of each model); disagreements as notes.
    Only for the notes: right answers come from the reference."""
    from recserve.control.client import RecClient

    got: dict[str, list[tuple[str, Answer]]] = {}
    notes = []
    for inst in fleet.instances():
        if inst.state != "healthy":
            continue
        try:
            with RecClient(f"127.0.0.1:{inst.grpc_port}", timeout_s=5.0, retry_policy=None) as c:
                for n in models:
                    got.setdefault(n, []).append((inst.id, ask(c, spec, n)))
        except Exception as exc:
            notes.append(f"{inst.id}: {exc}"[:200])
    for n, pairs in got.items():
        first_id, first = pairs[0]
        for iid, a in pairs[1:]:
            why = differs(spec, n, a, first)
            if why:
                notes.append(f"instances disagree on {n} ({first_id} vs {iid}): {why}"[:300])
    return got, notes


class SpecJudge:
    """Right answers for the probe's golden requests on exactly the desired versions: the reference outside
    Triton (or the spec's recorded answers, for the versions they were recorded on), never the fleet."""

    def __init__(self, spec: ServingSpec, reference_cls=None):
        if reference_cls is None:
            from recserve.control.spec.reference import Reference as reference_cls
        self.spec, self.reference_cls = spec, reference_cls

    def expected(self, desired: Mapping[str, list[int]], models: Sequence[str]
                 ) -> tuple[dict[tuple[str, int], Answer], str]:
        """((model, golden index) -> expected answer, problem); a problem means nothing can be judged."""
        latest = {m: max(v) for m, v in desired.items() if v}
        out: dict[tuple[str, int], Answer] = {}
        try:
            ref = None
            for n in models:
                m = self.spec.models[n]
                if m.expected == "recorded":
                    differ = {s: (latest.get(s), v) for s, v in m.recorded_versions.items() if latest.get(s) != v}
                    if differ:
                        return {}, f"{m.golden_file} holds answers for other versions of {n}: {differ}"
                    out.update({(n, i): dict(g.expected) for i, g in enumerate(m.golden)})
                    continue
                ref = ref or self.reference_cls(self.spec.repository, latest)
                for i, g in enumerate(m.golden):
                    out[(n, i)] = unbatched(m, ref.infer(n, batched(m, g.inputs)))
        except Exception as exc:  # noqa: BLE001 - any failure of the reference leaves answers unjudged, said
            return {}, f"the reference failed: {type(exc).__name__}: {str(exc)[:300]}"
        return out, ""

    def rematch(self, records: list, acceptable: list[dict[tuple[str, int], Answer]]) -> list:
        """Set ``matched`` on every served (not degraded) answer: right when it passes one of the acceptable
        answer sets (several during a rollover to a real new version) under the spec's rules."""
        seen: dict[tuple, bool] = {}
        out = []
        for r in records:
            if not (r.ok and not r.degraded and r.answer is not None and r.golden is not None):
                out.append(r)
                continue
            key = (r.model, r.golden, tuple((k, np.asarray(v).tobytes()) for k, v in sorted(r.answer.items())))
            if key not in seen:
                wants = [a[(r.model, r.golden)] for a in acceptable if (r.model, r.golden) in a]
                seen[key] = any(not differs(self.spec, r.model, r.answer, w) for w in wants)
            out.append(dataclasses.replace(r, matched=seen[key]))
        return out
