"""Upgrade path of the per-instance admin keys: a control plane from before them left instances running with the one
fleet-wide ``<root>/admin.key``; the new control plane must still reach their repository API to adopt them. One
tritonserver with no models (a few seconds)."""

from __future__ import annotations

import os

from recserve.control.fleet.fleet import Fleet, FleetConfig
from recserve.control.keys import read_secret
from recserve.control.runtime.triton import DEFAULT_REPOSITORY, TritonConfig, TritonServer
from recserve.control.state.store import InstanceRecord, State


def test_instances_running_with_the_old_fleet_key_stay_reachable_for_adoption(tmp_path):
    root = tmp_path / "runtime"
    legacy = read_secret(root / "admin.key")  # what the older control plane made and gave every instance
    old = TritonServer(TritonConfig(workdir=root / "instances" / "t1", models=[], admin_key=legacy, name="t1"))
    old.start()
    try:
        state = State(root / "state.db")
        for iid, slot, pid, port in (("t1", 0, old.pid, old.config.http_port), ("t2", 1, 0, 0)):  # t2: not running
            (root / "instances" / iid).mkdir(parents=True, exist_ok=True)
            state.save_instance(InstanceRecord(id=iid, slot=slot, role="primary" if slot == 0 else "standby",
                                               state="healthy", grpc_port=old.config.grpc_port if pid else 0,
                                               http_port=port, metrics_port=0, pid=pid,
                                               workdir=str(root / "instances" / iid)))
        state.close()
        fleet = Fleet(FleetConfig(root=root, repository=DEFAULT_REPOSITORY))
        try:
            own = root / "instances" / "t1" / "admin.key"
            assert own.read_text() == legacy and os.stat(own).st_mode & 0o777 == 0o600
            assert not (root / "instances" / "t2" / "admin.key").exists()
            srv = fleet.instances.server(fleet.state.instance("t1"))  # what adoption's deep check asks through
            assert srv.admin_key == legacy and srv.loaded_versions() == {}
            story = [e["message"] for e in fleet.state.events(10, kind="security")]
            assert any("t1" in m and "fleet-wide admin key" in m for m in story), story
        finally:
            fleet.state.close()
    finally:
        old.stop()
