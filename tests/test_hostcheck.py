"""The /proc exposure check (control/runtime/hostcheck.py): keys on command lines are readable by every local user
unless /proc hides other users' processes. Fake mounts and cgroup files only; no process is started."""

from __future__ import annotations

from pathlib import Path

import pytest

from recserve.control.runtime import hostcheck
from recserve.control.runtime.hostcheck import EXPOSURE, proc_exposure_warning, proc_hidepid, systemd_unit

PLAIN = "sysfs /sys sysfs rw,nosuid 0 0\nproc /proc proc rw,nosuid,nodev,noexec,relatime 0 0\n"
HIDDEN = "proc /proc proc rw,nosuid,nodev,noexec,relatime,hidepid=invisible 0 0\n"


def _file(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def _never(unit):  # a systemctl that must not be asked outside systemd
    raise AssertionError(f"systemctl asked about {unit} outside systemd")


@pytest.mark.parametrize("options", ["hidepid=invisible", "hidepid=2", "hidepid=noaccess", "hidepid=1"])
def test_no_warning_when_proc_hides_other_users_processes(tmp_path, options):
    mounts = _file(tmp_path, "mounts", f"proc /proc proc rw,relatime,{options} 0 0\n")
    assert proc_exposure_warning(mounts, env={}, protect_proc=_never) is None


@pytest.mark.parametrize("text", [PLAIN, "proc /proc proc rw,relatime,hidepid=0 0 0\n",
                                  "proc /proc proc rw,hidepid=off 0 0\n",
                                  HIDDEN + "proc /proc proc rw,relatime 0 0\n"])  # the last mount at /proc counts
def test_warning_when_proc_has_no_hidepid(tmp_path, text):
    w = proc_exposure_warning(_file(tmp_path, "mounts", text), env={}, protect_proc=_never)
    assert w and w.startswith(EXPOSURE) and "without hidepid" in w and "hidepid=invisible" in w, w
    assert "systemd" not in w  # not started by systemd: no unit to talk about


def test_unknown_when_no_procfs_is_mounted_at_proc(tmp_path):
    assert proc_hidepid(tmp_path / "absent") is None
    w = proc_exposure_warning(_file(tmp_path, "mounts", "proc /other proc rw 0 0\n"), env={}, protect_proc=_never)
    assert w and "unknown" in w, w


def test_under_systemd_the_unit_and_its_protect_proc_are_named(tmp_path):
    cgroup = _file(tmp_path, "cgroup", "0::/system.slice/recserve.service\n")
    asked = []
    w = proc_exposure_warning(_file(tmp_path, "mounts", PLAIN), env={"INVOCATION_ID": "abc"},
                              protect_proc=lambda unit: asked.append(unit) or "default", cgroup=cgroup)
    assert asked == ["recserve.service"]
    assert w and "systemd unit recserve.service: ProtectProc=default" in w and "without hidepid" in w, w
    # no systemctl (or an old systemd): said to be unknown
    w = proc_exposure_warning(_file(tmp_path, "mounts", PLAIN), env={"INVOCATION_ID": "abc"},
                              protect_proc=lambda unit: None, cgroup=cgroup)
    assert w and "ProtectProc=unknown" in w, w


def test_under_systemd_a_hidepid_seen_through_protect_proc_is_not_taken_for_the_hosts(tmp_path):
    """ProtectProc=invisible gives the unit its own hidepid procfs: /proc/mounts then says hidepid whatever the host's
    /proc says, so the host's mount is read through PID 1, and the answer is 'unknown' when that cannot be read."""
    env, cgroup = {"INVOCATION_ID": "abc"}, _file(tmp_path, "cgroup", "0::/system.slice/recserve.service\n")
    own = _file(tmp_path, "mounts", HIDDEN)

    def check(host: Path) -> str | None:
        return proc_exposure_warning(own, env=env, protect_proc=lambda unit: "invisible", cgroup=cgroup,
                                     host_mounts=host)

    assert check(_file(tmp_path, "host-hidden", HIDDEN)) is None
    w = check(_file(tmp_path, "host-plain", PLAIN))
    assert w and "without hidepid" in w and "ProtectProc=invisible" in w, w
    w = check(tmp_path / "unreadable")
    assert w and "unknown" in w and "ProtectProc=invisible" in w, w
    # ProtectProc not known and hidepid seen: it may be the unit's own /proc, so not an all-clear
    w = proc_exposure_warning(own, env=env, protect_proc=lambda unit: None, cgroup=cgroup)
    assert w and "may be the unit's own" in w, w


def test_systemd_unit_from_the_cgroup_path(tmp_path):
    assert systemd_unit(_file(tmp_path, "a", "0::/system.slice/recserve.service\n")) == "recserve.service"
    assert systemd_unit(_file(tmp_path, "b", "1:name=systemd:/user.slice/user-1000.slice/run-r1.scope\n0::/\n")) \
        == "run-r1.scope"
    assert systemd_unit(_file(tmp_path, "c", "0::/\n")) is None
    assert systemd_unit(tmp_path / "absent") is None


def test_unit_protect_proc_without_systemctl_is_unknown(monkeypatch):
    monkeypatch.setattr(hostcheck.shutil, "which", lambda name: None)
    assert hostcheck.unit_protect_proc("recserve.service") is None


def test_the_warning_reaches_fleet_status_without_degrading_health(tmp_path, monkeypatch):
    """Said where operators look (``recctl status`` warnings, an event at start) but not the fleet's health: the
    host's hardening is not a serving problem. No process is started."""
    from recserve.control.fleet import fleet as fleet_mod
    from recserve.control.fleet.fleet import Fleet, FleetConfig
    from recserve.control.runtime.triton import DEFAULT_REPOSITORY
    from recserve.control.state.store import InstanceRecord

    mounts = _file(tmp_path, "mounts", PLAIN)
    monkeypatch.setattr(fleet_mod, "proc_exposure_warning", lambda: proc_exposure_warning(mounts, env={}))
    fleet = Fleet(FleetConfig(root=tmp_path / "runtime", repository=DEFAULT_REPOSITORY))
    try:
        (w,) = fleet.host_warnings
        assert w.startswith(EXPOSURE)
        for iid, slot, role in (("t1", 0, "primary"), ("t2", 1, "standby")):  # records only: a healthy pair
            fleet.state.save_instance(InstanceRecord(id=iid, slot=slot, role=role, state="healthy", grpc_port=0,
                                                     http_port=0, metrics_port=0, workdir=str(tmp_path / iid)))
        st = fleet.status()
        assert st.warnings == [w] and st.health == "ok", st.warnings
        assert [e["message"] for e in fleet.state.events(10, kind="security")] == [w]
        # the fleet holds the statistics key only; its front door matches that file
        assert fleet.config.frontdoor.admin_key_file == fleet.root / "stats.key"
        assert (fleet.root / "stats.key").stat().st_mode & 0o777 == 0o600 and not (fleet.root / "admin.key").exists()
    finally:
        fleet.state.close()
