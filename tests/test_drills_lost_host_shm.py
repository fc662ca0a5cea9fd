"""The lost-host drill's loss takes the host's /dev/shm with it: the killed servers' Python-stub regions are removed
while their instance directories still name them (the drill deletes the runtime root right after, and a run of
`make drills` left 20 regions per run behind before). No process is started: the regions are plain files made here."""

from __future__ import annotations

from recserve.control.runtime.triton import SHM_DIR, shm_prefix
from recserve.drills.lost_host import HostFleet


def test_the_loss_removes_the_killed_servers_shm_regions(tmp_path):
    host = HostFleet.__new__(HostFleet)  # no repository copy, no ports: only what kill_all reads
    host.base = tmp_path / "lost"
    mine, other = [], SHM_DIR / "recserve-0000000000-t1-not-this-fleet"
    for name in ("t1", "t2"):
        inst = host.base / "host" / "runtime" / "instances" / name
        inst.mkdir(parents=True)
        mine.append(SHM_DIR / f"{shm_prefix(inst, name)}region")
    try:
        for p in (*mine, other):
            p.write_bytes(b"x")
        assert host.kill_all() == []  # nothing of this fleet runs
        assert not any(p.exists() for p in mine) and other.exists()  # only this fleet's regions
    finally:
        for p in (*mine, other):
            p.unlink(missing_ok=True)
