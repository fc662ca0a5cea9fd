"""FleetOwner's server flags: they set up a private fleet and never touch a running one."""

from __future__ import annotations

import pytest

from recserve.drills.fleet import FleetError
from recserve.drills.session import FleetOwner


def test_server_flags_are_refused_for_a_running_fleet_before_anything_is_reached():
    owner = FleetOwner(control="127.0.0.1:1", server_args=["--warmup-rounds", "0"], log=lambda m: None)
    with pytest.raises(FleetError, match=r"server flags \['--warmup-rounds', '0'\].*never changed"):
        owner.__enter__()
    assert owner.started is None and owner.tmp is None  # nothing was started or made


def test_server_flags_go_after_the_private_fleets_own(monkeypatch, tmp_path):
    """A private fleet's control plane gets the flags, after --mode (the drills' own) so a measurement's flag
    stands; the start is stopped at the process boundary (no fleet runs in this test)."""
    from recserve.drills import session as mod

    seen = {}

    def fake_start(self, timeout_s=0.0):
        seen["command"] = self.command()
        raise RuntimeError("stop here")

    monkeypatch.setattr(mod.ControlPlaneProcess, "start", fake_start)
    monkeypatch.setattr(mod.tempfile, "mkdtemp", lambda prefix: str(tmp_path / "fleet"))
    (tmp_path / "fleet").mkdir()
    owner = FleetOwner(private=True, mode="active-active", server_args=["--warmup-rounds", "0"],
                       log=lambda m: None, repository=tmp_path / "repo")
    (tmp_path / "repo").mkdir()
    with pytest.raises(RuntimeError, match="stop here"):
        owner.__enter__()
    cmd = seen["command"]
    assert cmd[-4:] == ["--mode", "active-active", "--warmup-rounds", "0"]
    assert not (tmp_path / "fleet").exists()  # the half-started private fleet's directory was removed
