"""Which models and versions a fleet serves: the closure of the ensembles, verified versions, and loading them.

One implementation of the repository rules, the ``Catalog``: the local fleet and the Kubernetes pool (``KubePool``)
each hold one, so both drivers serve exactly the same closure and refuse the same versions.
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from recserve.control.fleet.config import FleetError
from recserve.control.runtime.triton import TritonServer, ensemble_steps, servable_models
from recserve.control.state.snapshots import RepositoryError, has_manifests, verify_version, versions_on_disk
from recserve.control.state.store import State


def model_config(repository: Path, model: str, versions: list[int]) -> dict:
    """The model's config.pbtxt as Triton's JSON config, pinned to exactly ``versions``.

    A load with a config override replaces the whole config, so the override is the full committed config.
    """
    text = (repository / model / "config.pbtxt").read_text()
    msg = text_format.Parse(text, model_config_pb2.ModelConfig())
    cfg = json_format.MessageToDict(msg, preserving_proto_field_name=True)
    cfg["version_policy"] = {"specific": {"versions": [int(v) for v in sorted(versions)]}}
    return cfg


class Catalog:
    """The models and versions one fleet serves, from its repository and the state store's desired versions.

    ``models``: the top models served (None: every ensemble of the repository). ``host_checks``: refuse top
    models this host cannot load (built, TensorRT only with a GPU): the local fleet's rule; a Kubernetes pool's
    pods run elsewhere, so it names its models and they are taken as they are.
    """

    def __init__(self, repository: Path, state: State, models: list[str] | None = None, host_checks: bool = True):
        self._repository = Path(repository)
        self._state = state
        self._models = list(models) if models is not None else None
        self._host_checks = host_checks

    def top_models(self) -> list[str]:
        if not self._host_checks:
            return list(self._models or [])
        servable = servable_models(self._repository)
        if self._models is not None:
            missing = [m for m in self._models if m not in servable]
            if missing:
                raise FleetError(f"models {missing} cannot be served from {self._repository} (not built?)",
                                 "FAILED_PRECONDITION")
            return list(self._models)
        return [m for m in servable if 'platform: "ensemble"' in (self._repository / m / "config.pbtxt").read_text()]

    def model_closure(self) -> list[str]:
        """Every model the fleet serves, leaves before the ensembles that compose them."""
        out: list[str] = []
        for top in self.top_models():
            for step in ensemble_steps(self._repository / top):
                if step not in out:
                    out.append(step)
        for top in self.top_models():
            if top not in out:
                out.append(top)
        return out

    def versioned_models(self) -> list[str]:
        """Models built with manifests: the ones rollouts move between versions."""
        return [m for m in self.model_closure() if has_manifests(self._repository, m)]

    def initial_desired(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for m in self.model_closure():
            versions = versions_on_disk(self._repository, m)
            if has_manifests(self._repository, m):
                good = [v for v in versions if verify_version(self._repository, m, v).verified]
                if not good:
                    raise FleetError(f"model {m!r}: no version passes its manifest sha256 check", "FAILED_PRECONDITION")
                out[m] = [good[-1]]
            else:
                out[m] = [versions[-1]]
        return out

    def desired(self) -> dict[str, list[int]]:
        d = self._state.desired()
        return {m: d[m] for m in self.model_closure() if m in d}

    def check_version(self, model: str, version: int) -> None:
        """Refuse a version that is unknown or fails its sha256 (RepositoryError names which and why)."""
        info = verify_version(self._repository, model, version)
        if has_manifests(self._repository, model) and not info.verified:
            raise RepositoryError(f"model {model!r} version {version} fails verification: {info.problem}")

    def load_versions(self, server: TritonServer, versions: dict[str, list[int]], timeout: float,
                      only: list[str] | None = None) -> None:
        """Load exactly ``versions`` (leaves first, then ensembles); Triton loads before it unloads."""
        for m in self.model_closure():
            if only is not None and m not in only:
                continue
            for v in versions[m]:
                self.check_version(m, v)
            server.load_model(m, config=model_config(self._repository, m, versions[m]),
                              timeout=timeout)
