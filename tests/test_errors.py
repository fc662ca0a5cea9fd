"""One error type with codes (control/errors.py), mapped to gRPC statuses in one place (control/api/errors.py).

The servicer tests call the real ``ControlPlane`` methods with a fake context whose ``abort`` raises, the way
grpc's does; the fleet behind them is a stand-in, the model repository and snapshot store are real files.
"""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import grpc
import pytest

from recserve.control.api import errors as api_errors
from recserve.control.api.proto import control_pb2 as pb
from recserve.control.api.server import ControlPlane
from recserve.control.backup.policy import BackupError
from recserve.control.errors import ErrorCode, RecserveError
from recserve.control.fleet.config import FleetError as FleetConfigError
from recserve.control.fleet.fleet import FleetError
from recserve.control.routing.router import RouterError
from recserve.control.state.snapshots import RepositoryError, SnapshotStore, verify_version, versions_on_disk

#: What clients see for each code: the names match, and clients (recctl, drills, tests) depend on these statuses.
EXPECTED = {
    ErrorCode.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    ErrorCode.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorCode.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorCode.INTERNAL: grpc.StatusCode.INTERNAL,
}


class Aborted(Exception):
    pass


class FakeContext:
    """Records the status and details, and raises like ``grpc.ServicerContext.abort``."""

    def __init__(self):
        self.code = self.details = None

    def abort(self, code, details):
        self.code, self.details = code, details
        raise Aborted(f"{code.name}: {details}")

    def is_active(self):
        return True


class OpenGuard:
    def authorize(self, context):
        pass


# ---------------------------------------------------------------------------------------------- the mapping
@pytest.mark.parametrize("code", list(ErrorCode))
def test_each_code_maps_to_the_expected_status(code):
    assert api_errors.status_of(code) == EXPECTED[code]
    assert api_errors.STATUS[code].name == code.name == code.value  # a code's name is its status's name


def test_every_code_has_a_status():
    """Fails when an ErrorCode is added without its gRPC status (add it to STATUS, and to EXPECTED here)."""
    assert set(api_errors.STATUS) == set(ErrorCode)
    assert set(EXPECTED) == set(ErrorCode)
    assert all(isinstance(s, grpc.StatusCode) for s in api_errors.STATUS.values())


def test_abort_answers_with_the_status_and_message():
    ctx = FakeContext()
    with pytest.raises(Aborted):
        api_errors.abort(ctx, FleetError("unknown instance 't9'", ErrorCode.NOT_FOUND))
    assert ctx.code == grpc.StatusCode.NOT_FOUND and ctx.details == "unknown instance 't9'"


def test_call_maps_recserve_errors_and_lets_bugs_through():
    ctx = FakeContext()
    assert api_errors.call(ctx, lambda a, b: a + b, 1, 2) == 3 and ctx.code is None

    def refused():
        raise RouterError("knee_rps must be within 1..1000000 requests/s, got 0", "INVALID_ARGUMENT")

    with pytest.raises(Aborted):
        api_errors.call(ctx, refused)
    assert ctx.code == grpc.StatusCode.INVALID_ARGUMENT

    def bug():
        raise KeyError("bug")

    ctx = FakeContext()
    with pytest.raises(KeyError):  # gRPC answers UNKNOWN: a bug is not dressed up as a refusal
        api_errors.call(ctx, bug)
    assert ctx.code is None


# ---------------------------------------------------------------------------------------------- the error type
def test_control_plane_errors_are_recserve_errors_and_keep_their_old_bases():
    for cls, base in ((FleetError, RuntimeError), (RouterError, RuntimeError), (RepositoryError, ValueError),
                      (BackupError, RuntimeError)):
        assert issubclass(cls, RecserveError) and issubclass(cls, base), cls
    assert FleetError is FleetConfigError  # re-exported by control/fleet/fleet.py


def test_codes_given_by_name_are_typed_and_still_compare_as_names():
    e = FleetError("no free slot", "RESOURCE_EXHAUSTED")
    assert e.code is ErrorCode.RESOURCE_EXHAUSTED and e.code == "RESOURCE_EXHAUSTED"
    assert FleetError("refused").code is ErrorCode.FAILED_PRECONDITION
    assert RouterError("refused").code is ErrorCode.FAILED_PRECONDITION
    assert RepositoryError("differs").code is ErrorCode.FAILED_PRECONDITION
    assert BackupError("target down").code is ErrorCode.UNAVAILABLE
    with pytest.raises(ValueError):
        FleetError("typo", "NOT_FOUNDD")
    back = pickle.loads(pickle.dumps(FleetError("gone", ErrorCode.NOT_FOUND)))
    assert type(back) is FleetError and back.code is ErrorCode.NOT_FOUND and str(back) == "gone"


def test_repository_unknowns_say_not_found_without_string_matching(tmp_path):
    (tmp_path / "ranker" / "1").mkdir(parents=True)
    (tmp_path / "ranker" / "config.pbtxt").write_text('name: "ranker"\n')
    with pytest.raises(RepositoryError) as exc:
        versions_on_disk(tmp_path, "ghost")
    assert exc.value.code is ErrorCode.NOT_FOUND
    with pytest.raises(RepositoryError) as exc:
        verify_version(tmp_path, "ranker", 7)
    assert exc.value.code is ErrorCode.NOT_FOUND
    with pytest.raises(RepositoryError) as exc:
        SnapshotStore(tmp_path, tmp_path / "backups").get("nope")
    assert exc.value.code is ErrorCode.NOT_FOUND


# ---------------------------------------------------------------------------------------------- the servicer
def _servicer(tmp_path, served: list[str]) -> ControlPlane:
    repo = tmp_path / "repo"
    repo.mkdir()
    fleet = SimpleNamespace(repository=repo, model_closure=lambda: list(served), desired=lambda: {})
    plane = ControlPlane(fleet, rollouts=None, snapshots=SnapshotStore(repo, tmp_path / "backups"),
                         guard=OpenGuard(), endpoints={})
    plane.ready.set()
    return plane


def test_unknown_model_in_the_repository_aborts_not_found_through_the_servicer(tmp_path):
    """The fleet serves 'ghost' but the repository has no such model: list_versions raises RepositoryError
    (unknown model), and ListVersions answers NOT_FOUND with its message."""
    plane = _servicer(tmp_path, served=["ghost"])
    ctx = FakeContext()
    with pytest.raises(Aborted):
        plane.ListVersions(pb.ListVersionsRequest(model="ghost"), ctx)
    assert ctx.code == grpc.StatusCode.NOT_FOUND, ctx.details
    assert ctx.details.startswith("unknown model 'ghost'")


def test_unknown_snapshot_and_unserved_model_abort_not_found(tmp_path):
    plane = _servicer(tmp_path, served=["ranker"])
    ctx = FakeContext()
    with pytest.raises(Aborted):
        plane.RestoreSnapshot(pb.RestoreSnapshotRequest(id="nope"), ctx)
    assert ctx.code == grpc.StatusCode.NOT_FOUND and "unknown snapshot" in ctx.details
    ctx = FakeContext()
    with pytest.raises(Aborted):
        plane.ListVersions(pb.ListVersionsRequest(model="nope"), ctx)
    assert ctx.code == grpc.StatusCode.NOT_FOUND and "the fleet serves ['ranker']" in ctx.details


def test_fleet_error_codes_reach_the_client_unchanged(tmp_path):
    plane = _servicer(tmp_path, served=[])
    for code in (ErrorCode.RESOURCE_EXHAUSTED, ErrorCode.INVALID_ARGUMENT, ErrorCode.UNAVAILABLE):
        def add_instance(role, code=code):
            raise FleetError(f"refused {role}", code.value)  # the string form existing call sites use

        plane.fleet.add_instance = add_instance
        ctx = FakeContext()
        with pytest.raises(Aborted):
            plane.AddInstance(pb.AddInstanceRequest(role="standby"), ctx)
        assert ctx.code == EXPECTED[code] and ctx.details == "refused standby"


def test_not_ready_and_backup_refusals(tmp_path):
    plane = _servicer(tmp_path, served=[])
    plane.ready.clear()
    ctx = FakeContext()
    with pytest.raises(Aborted):
        plane.Scale(pb.ScaleRequest(active=2), ctx)
    assert ctx.code == grpc.StatusCode.UNAVAILABLE and "still bringing the fleet up" in ctx.details
    ctx = FakeContext()
    with pytest.raises(Aborted):
        plane.RunBackup(pb.RunBackupRequest(), ctx)
    assert ctx.code == grpc.StatusCode.FAILED_PRECONDITION and "no backup policy" in ctx.details

    def failing_run(trigger):
        raise BackupError("target /nowhere: disk full")

    def failing_list(prefix):
        raise OSError("connection refused")

    plane.backups = SimpleNamespace(manager=SimpleNamespace(run=failing_run, store=SimpleNamespace(
        describe=lambda: "s3://b/p", list=failing_list)))
    ctx = FakeContext()
    with pytest.raises(Aborted):
        plane.RunBackup(pb.RunBackupRequest(note="x"), ctx)
    assert ctx.code == grpc.StatusCode.UNAVAILABLE and ctx.details == "backup failed: target /nowhere: disk full"
    ctx = FakeContext()
    with pytest.raises(Aborted):
        plane.ListBackups(pb.ListBackupsRequest(), ctx)
    assert ctx.code == grpc.StatusCode.UNAVAILABLE and ctx.details == "backup target s3://b/p: connection refused"
