"""The control API's own defences (issue 10): constant-time bearer token, audited mutating calls, refusal of
malformed request bytes, secret files with loose modes, optional TLS.

The first part runs the real ``ApiGuard`` interceptor in a real in-process gRPC server (with a small servicer of
the real ControlPlane service, so the failure path can be triggered on purpose) and a real SQLite event log. The
second part runs against a real control plane (instances, HAProxy) that speaks TLS with a certificate made here.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest

from recserve.control.api.audit import ApiGuard
from recserve.control.api.proto import control_pb2 as pb
from recserve.control.api.proto import control_pb2_grpc as pbg
from recserve.control.api.tls import TlsConfigError, control_channel, server_tls
from recserve.control.keys import SecretFileError, check_private, fingerprint, read_secret
from recserve.control.runtime.procs import pid_alive
from recserve.control.runtime.triton import free_port, port_in_use
from recserve.control.state.store import State
from tests.fleet_fixtures import FleetProcess, all_healthy_exact, running_fleet

pytestmark = pytest.mark.timeout(600)

TOKEN = "s3cret-token-for-tests"
SERVICE = "recserve.control.v1.ControlPlane"
#: The control API's read-only RPCs: open without a token and not audited. Every other RPC must call _auth.
READ_ONLY = {"GetStatus", "ListVersions", "GetRollout", "ListSnapshots", "GetBackupPolicy", "ListBackups"}


def make_cert(directory: Path, name: str = "server") -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 / localhost and its 0600 private key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "recserve control plane (test)")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


# ============================================================================ in-process: the guard itself
class _Servicer(pbg.ControlPlaneServicer):
    """Three mutating methods with known outcomes (ok, refused by the method, failed) and one read-only one."""

    def __init__(self, guard: ApiGuard):
        self.guard = guard
        self.promoted: list[str] = []

    def PromoteInstance(self, request, context):
        self.guard.authorize(context)
        self.promoted.append(request.id)
        return pb.Instance(id=request.id, role="primary")

    def DrainInstance(self, request, context):
        self.guard.authorize(context)
        if request.id == "t99":
            context.abort(grpc.StatusCode.NOT_FOUND, "no instance t99")
        raise RuntimeError("disk full")

    def Rollover(self, request, context):
        self.guard.authorize(context)
        for phase in ("canary", "done"):
            yield pb.RolloutEvent(phase=phase, status="succeeded" if phase == "done" else "running")

    def GetStatus(self, request, context):
        return pb.FleetStatus(health="ok")


@pytest.fixture
def guarded(tmp_path):
    """A real gRPC server with the guard on a free loopback port; yields its stub, channel, servicer, state, address."""
    state = State(tmp_path / "state.db")
    guard = ApiGuard(TOKEN, tmp_path / "token", record=lambda m: state.event("audit", m))
    servicer = _Servicer(guard)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[guard])
    pbg.add_ControlPlaneServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield SimpleNamespace(stub=pbg.ControlPlaneStub(channel), channel=channel, servicer=servicer, state=state,
                              address=f"127.0.0.1:{port}")
    finally:
        channel.close()
        server.stop(0).wait()
        state.close()


def _audits(state: State) -> list[str]:
    return [e["message"] for e in state.events(200, kind="audit")]


BAD_TOKENS = {  # name -> authorization metadata (None: no metadata at all)
    "none": None,
    "empty": "",
    "wrong": "Bearer wrong-token",
    "prefix of the right one": f"Bearer {TOKEN[:-1]}",
    "right one plus a byte": f"Bearer {TOKEN}x",
    "wrong scheme": f"Basic {TOKEN}",
    "no scheme": TOKEN,
    "huge": "Bearer " + "A" * 4000,
}
#: Header values gRPC client libraries refuse to send ("Illegal header value"), so they go out through curl's raw
#: HTTP/2 (``raw_grpc``): an attacker is not bound to a well-behaved client.
RAW_BAD_TOKENS = {"non-ASCII": "Bearer tökén-✓".encode(), "control bytes": b"Bearer \x01\x7f\x1b[2J"}


def raw_grpc(address: str, method: str, request: bytes, headers: list[bytes],
             ca: Path | None = None) -> tuple[int, str]:
    """One gRPC call by curl over HTTP/2 with arbitrary header bytes; returns (grpc-status, grpc-message)."""
    if shutil.which("curl") is None:
        pytest.fail("curl is missing: 'make setup' installs it (it sends the header bytes gRPC libraries refuse)")
    frame = b"\x00" + len(request).to_bytes(4, "big") + request
    tls = ["--http2", "--cacert", str(ca)] if ca else ["--http2-prior-knowledge"]
    url = f"{'https' if ca else 'http'}://{address}/{SERVICE}/{method}"
    cmd = ["curl", "-sS", "--max-time", "10", "-D", "-", "-o", "/dev/null", "-H", "content-type: application/grpc",
           "-H", "te: trailers", "--data-binary", "@-", *(x for h in headers for x in ("-H", h)), *tls, url]
    r = subprocess.run(cmd, input=frame, capture_output=True, timeout=30)
    out = r.stdout.decode("utf-8", "replace")
    fields = dict(line.split(": ", 1) for line in out.splitlines() if line.startswith("grpc-"))
    assert "grpc-status" in fields, (r.returncode, out, r.stderr)
    return int(fields["grpc-status"]), fields.get("grpc-message", "")


def _metadata(value) -> list[tuple[str, str | bytes]]:
    return [] if value is None else [("authorization", value)]


def test_good_token_passes_and_every_bad_one_is_refused_and_audited(guarded):
    stub, servicer, state = guarded.stub, guarded.servicer, guarded.state
    ok = stub.PromoteInstance(pb.InstanceRequest(id="t2"), metadata=[("authorization", f"Bearer {TOKEN}")])
    assert ok.role == "primary" and servicer.promoted == ["t2"]
    ok = stub.PromoteInstance(pb.InstanceRequest(id="t3"), metadata=[("authorization", f"bearer {TOKEN}")])
    assert servicer.promoted == ["t2", "t3"]  # RFC 7235: the scheme is case-insensitive
    for name, value in BAD_TOKENS.items():
        with pytest.raises(grpc.RpcError) as exc:
            stub.PromoteInstance(pb.InstanceRequest(id="t1"), metadata=_metadata(value))
        assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED, (name, exc.value.details())
        assert "authorization: Bearer <token>" in exc.value.details() and "token" in exc.value.details()
    request = pb.InstanceRequest(id="t1").SerializeToString()
    for name, value in RAW_BAD_TOKENS.items():
        code, message = raw_grpc(guarded.address, "PromoteInstance", request, [b"authorization: " + value])
        assert code == grpc.StatusCode.UNAUTHENTICATED.value[0] and "wrong bearer token" in message, (name, message)
    assert servicer.promoted == ["t2", "t3"]  # no bad token reached the method's body
    audits = _audits(state)
    assert len(audits) == 2 + len(BAD_TOKENS) + len(RAW_BAD_TOKENS), audits
    good = f"token {fingerprint(TOKEN)}"
    assert audits[0].startswith('PromoteInstance {id: "t2"} from ipv4:127.0.0.1:') and audits[0].endswith(
        f"with {good}: ok"), audits[0]
    for a in audits[2:]:
        assert a.startswith('PromoteInstance {id: "t1"} from ipv4:127.0.0.1:'), a
        assert ": refused UNAUTHENTICATED: " in a and good not in a, a
    assert any("no token: refused UNAUTHENTICATED: no 'authorization' metadata" in a for a in audits)
    assert any("the authorization scheme must be 'Bearer'" in a for a in audits)
    assert sum("no Bearer scheme" in a for a in audits) == 3  # empty, wrong scheme, token alone
    assert sum("wrong bearer token" in a for a in audits) == 6  # wrong, prefix, +1 byte, huge, 2 raw
    assert not [a for a in audits if TOKEN[:6] in a or "AAAA" in a or "k\u00e9n" in a or "\x1b" in a]  # no tokens
    assert all(len(a) <= 1000 for a in audits)


def test_outcomes_refused_failed_and_streams_are_audited(guarded):
    stub, state = guarded.stub, guarded.state
    auth = [("authorization", f"Bearer {TOKEN}")]
    with pytest.raises(grpc.RpcError) as exc:
        stub.DrainInstance(pb.InstanceRequest(id="t99"), metadata=auth)
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as exc:
        stub.DrainInstance(pb.InstanceRequest(id="t1"), metadata=auth)
    assert exc.value.code() == grpc.StatusCode.UNKNOWN
    assert [e.phase for e in stub.Rollover(pb.RolloverRequest(model="ranker", version=2), metadata=auth)] == \
        ["canary", "done"]
    with pytest.raises(grpc.RpcError) as exc:
        next(iter(stub.Rollover(pb.RolloverRequest(model="ranker", version=2))))
    assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert stub.GetStatus(pb.GetStatusRequest()).health == "ok"  # read-only: allowed, not audited
    audits = _audits(state)
    assert [a.rsplit(": ", 1)[0].split(" ", 1)[0] for a in audits] == \
        ["DrainInstance", "DrainInstance", "Rollover", "Rollover"], audits
    assert audits[0].endswith("refused NOT_FOUND: no instance t99"), audits[0]
    assert audits[1].endswith("failed: RuntimeError: disk full"), audits[1]
    assert audits[2].startswith('Rollover {model: "ranker" version: 2}') and audits[2].endswith(": ok")
    assert "no token: refused UNAUTHENTICATED" in audits[3]


@pytest.mark.parametrize("method, garbage", [
    ("PromoteInstance", b"\xff" * 64),                       # not protobuf wire format at all
    ("PromoteInstance", b"\x0a\x02\xff\xfe"),                # field 'id' holding invalid UTF-8
    ("PromoteInstance", b"\x0a\xff\xff\xff\xff\x0f" + b"x"),  # length far beyond the bytes sent
    ("Rollover", b"\x12\x05abc"),                            # truncated field
])
def test_malformed_request_bytes_are_refused_before_any_handler_and_audited(guarded, method, garbage):
    stub, channel, servicer, state = guarded.stub, guarded.channel, guarded.servicer, guarded.state
    auth = [("authorization", f"Bearer {TOKEN}")]
    path = f"/{SERVICE}/{method}"
    call = channel.unary_unary(path) if method != "Rollover" else channel.unary_stream(path)
    with pytest.raises(grpc.RpcError) as exc:
        r = call(garbage, metadata=auth, timeout=5)
        if method == "Rollover":
            list(r)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.value.details()
    assert f"not a valid {method} request message" in exc.value.details()
    assert servicer.promoted == []
    assert stub.PromoteInstance(pb.InstanceRequest(id="t2"), metadata=auth).role == "primary"  # still serving
    audits = _audits(state)
    assert audits[0].startswith(f"{method} {{<malformed>}} from ipv4:127.0.0.1:") and \
        "refused INVALID_ARGUMENT" in audits[0], audits


def test_a_server_built_without_the_interceptor_refuses_mutating_calls(tmp_path):
    """Fail closed: authorize() outside the interceptor could not audit, so it refuses even a good token."""
    guard = ApiGuard(TOKEN, tmp_path / "token", record=lambda m: pytest.fail(f"nothing to audit here: {m}"))
    servicer = _Servicer(guard)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))  # no interceptors=[guard]
    pbg.add_ControlPlaneServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch, pytest.raises(grpc.RpcError) as exc:
            pbg.ControlPlaneStub(ch).PromoteInstance(pb.InstanceRequest(id="t2"),
                                                     metadata=[("authorization", f"Bearer {TOKEN}")])
        assert exc.value.code() == grpc.StatusCode.INTERNAL and "bypassed the audit" in exc.value.details()
        assert servicer.promoted == []
    finally:
        server.stop(0).wait()


# ============================================================================ secret files and TLS settings
def test_secret_files_are_created_private_and_loose_ones_refused(tmp_path):
    path = tmp_path / "token"
    value = read_secret(path)
    assert len(value) >= 32 and oct(path.stat().st_mode & 0o777) == "0o600" and read_secret(path) == value
    for mode in (0o644, 0o640, 0o604, 0o660):
        path.chmod(mode)
        with pytest.raises(SecretFileError) as exc:
            read_secret(path)
        assert str(path) in str(exc.value) and f"mode {mode:04o}" in str(exc.value) and "chmod 600" in str(exc.value)
        assert path.stat().st_mode & 0o777 == mode  # refused, not silently tightened
    path.chmod(0o400)
    assert read_secret(path) == value
    with pytest.raises(SecretFileError, match="cannot read secret file"):
        check_private(tmp_path / "missing")


def test_tls_settings_are_checked_before_anything_starts(tmp_path):
    cert, key = make_cert(tmp_path / "a")
    other_cert, other_key = make_cert(tmp_path / "b")
    assert server_tls(None, None) is None
    assert server_tls(cert, key).ca == cert.resolve()
    for args, words in (
        ((cert, None), "go together"),
        ((None, key), "go together"),
        ((None, None, cert), "--tls-ca needs"),
        ((cert, tmp_path / "nope.key"), "--tls-key"),
        ((cert, other_key), "matching private key"),
        ((key, key), "--tls-cert"),
    ):
        with pytest.raises(TlsConfigError, match=words):
            server_tls(*args)
    other_key.chmod(0o644)
    with pytest.raises(TlsConfigError, match="--tls-key: secret file .* has mode 0644"):
        server_tls(other_cert, other_key)


def _server_refuses(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    root = tmp_path / "root"
    port = free_port()
    r = subprocess.run([sys.executable, "-m", "recserve.control.server", "--root", str(root),
                        "--control-port", str(port),
                        "--grpc-port", str(free_port()), "--http-port", str(free_port()),
                        "--metrics-port", str(free_port()), *flags],
                       capture_output=True, text=True, timeout=120, cwd=str(Path(__file__).parent.parent))
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert not port_in_use(port)
    assert not (root / "state.db").exists() and not (root / "instances").exists()  # nothing was started
    assert not (root / "control.pid").exists()
    return r


def test_control_plane_refuses_loose_secret_files_or_plaintext_off_loopback(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "token").write_text("leaked\n")
    (root / "token").chmod(0o644)
    r = _server_refuses(tmp_path)
    assert f"control plane not started: secret file {root / 'token'} has mode 0644" in r.stderr, r.stderr
    (root / "token").chmod(0o600)
    (root / "admin.key").write_text("leaked too\n")
    (root / "admin.key").chmod(0o640)
    r = _server_refuses(tmp_path)
    assert f"secret file {root / 'admin.key'} has mode 0640" in r.stderr, r.stderr
    (root / "admin.key").chmod(0o600)
    r = _server_refuses(tmp_path, "--control-host", "0.0.0.0")
    assert "--control-host 0.0.0.0 is not loopback" in r.stderr and "--tls-cert" in r.stderr, r.stderr


# ============================================================================ a real fleet with a TLS control API
@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    base = tmp_path_factory.mktemp("apifleet")
    cert, key = make_cert(base / "tls")
    with running_fleet(base, up_args=("--tls-cert", str(cert), "--tls-key", str(key), "--mode", "primary-standby"),
                       ca=cert) as f:  # the audit tests use a standby
        yield f


def _snapshot(fleet: FleetProcess) -> list[tuple]:
    return [(i["id"], i["role"], i["state"], i["pid"]) for i in fleet.status()["instances"]]


def _serves(fleet: FleetProcess) -> None:
    from recserve.control.client import RecClient

    with RecClient(fleet.grpc_url, "grpc") as c:
        assert len(c.recommend(7, [11, 12, 13]).item_ids) == 20


def test_control_api_speaks_tls_only(fleet):
    """recctl finds TLS and its CA in endpoints.json; plaintext and an unknown CA get no answer."""
    import json

    before = _snapshot(fleet)
    ep = json.loads((fleet.root / "endpoints.json").read_text())
    assert ep["control_tls"] is True and ep["control_ca"] == str(fleet.ca.resolve())
    assert fleet.status()["health"] == "ok"  # recctl status over TLS, from endpoints.json alone
    address = f"127.0.0.1:{fleet.ports['control']}"
    stranger, _ = make_cert(fleet.root.parent / "stranger")
    for channel in (grpc.insecure_channel(address), control_channel(address, ca=stranger)):
        with channel, pytest.raises(grpc.RpcError) as exc:
            pbg.ControlPlaneStub(channel).GetStatus(pb.GetStatusRequest(), timeout=3)
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
    r = fleet.recctl("--ca", str(stranger), "status", check=False)
    assert r.returncode == 3 and "TLS handshake with the control plane" in " ".join(r.stderr.split()), r.stderr
    assert _snapshot(fleet) == before
    _serves(fleet)


def test_bad_tokens_and_malformed_bytes_change_nothing_and_are_audited(fleet):
    before = _snapshot(fleet)
    standby = next(i for i in before if i[1] == "standby")[0]
    s = fleet.stub
    channel = fleet._channel
    calls = {
        "PromoteInstance": lambda md: s.PromoteInstance(pb.InstanceRequest(id=standby), metadata=md, timeout=10),
        "RemoveInstance": lambda md: s.RemoveInstance(pb.InstanceRequest(id=standby), metadata=md, timeout=10),
        "Rollover": lambda md: next(iter(s.Rollover(pb.RolloverRequest(model="retrieval", version=1),
                                                    metadata=md, timeout=10))),
    }
    for name, value in BAD_TOKENS.items():
        for call in calls.values():
            with pytest.raises(grpc.RpcError) as exc:
                call(_metadata(value))
            assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED, (name, exc.value.details())
    request = pb.InstanceRequest(id=standby).SerializeToString()
    address = f"127.0.0.1:{fleet.ports['control']}"
    for name, value in RAW_BAD_TOKENS.items():
        code, message = raw_grpc(address, "PromoteInstance", request, [b"authorization: " + value], ca=fleet.ca)
        assert code == grpc.StatusCode.UNAUTHENTICATED.value[0] and "wrong bearer token" in message, (name, message)
    # every RPC of the service but the declared read-only ones refuses a call without a token (an RPC added
    # without ControlPlane._auth fails here; a new read-only one belongs in READ_ONLY)
    for method in pb.DESCRIPTOR.services_by_name["ControlPlane"].methods:
        if method.name in READ_ONLY:
            continue
        path = f"/{SERVICE}/{method.name}"
        call = channel.unary_stream(path) if method.server_streaming else channel.unary_unary(path)
        with pytest.raises(grpc.RpcError) as exc:
            r = call(b"", timeout=10)
            if method.server_streaming:
                list(r)
        assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED, (method.name, exc.value.details())
    # over gRPC's metadata size limit (8 KiB): the transport refuses it before any handler runs
    with pytest.raises(grpc.RpcError) as exc:
        calls["PromoteInstance"]([("authorization", "Bearer " + "A" * 65536)])
    assert exc.value.code() != grpc.StatusCode.OK
    for garbage in (b"\xff" * 64, b"\x0a\x02\xff\xfe"):
        with pytest.raises(grpc.RpcError) as exc:
            channel.unary_unary(f"/{SERVICE}/PromoteInstance")(garbage, metadata=fleet.auth, timeout=10)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.value.details()
    # a valid token on a call the fleet refuses is audited with the fleet token's fingerprint
    with pytest.raises(grpc.RpcError) as exc:
        s.PromoteInstance(pb.InstanceRequest(id="t99"), metadata=fleet.auth, timeout=10)
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    events = [e for e in s.GetStatus(pb.GetStatusRequest(events=500), timeout=10).events if e.kind == "audit"]
    msgs = [e.message for e in events]
    mutating = len(pb.DESCRIPTOR.services_by_name["ControlPlane"].methods) - len(READ_ONLY)
    refused = len(BAD_TOKENS) * len(calls) + len(RAW_BAD_TOKENS) + mutating
    assert len(msgs) == refused + 2 + 1, msgs
    assert sum(": refused UNAUTHENTICATED: " in m for m in msgs) == refused
    assert sum(m.startswith("PromoteInstance {<malformed>}") and "refused INVALID_ARGUMENT" in m for m in msgs) == 2
    token = (fleet.root / "token").read_text().strip()
    assert msgs[-1].startswith('PromoteInstance {id: "t99"} from ipv4:127.0.0.1:')
    assert f"with token {fingerprint(token)}: refused NOT_FOUND" in msgs[-1], msgs[-1]
    assert not [m for m in msgs if token in m]
    assert _snapshot(fleet) == before and all_healthy_exact(fleet.status())
    _serves(fleet)


def test_a_token_file_others_can_read_keeps_the_control_plane_down_and_the_fleet_serving(fleet):
    """Restart the control plane with a 0644 token: refused with the file and mode named, the data path keeps
    serving on the same processes; with 0600 again it adopts the fleet unchanged."""
    before = _snapshot(fleet)
    cp = fleet.control_pid()
    os.kill(cp, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while pid_alive(cp) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pid_alive(cp)
    token = fleet.root / "token"
    token.chmod(0o644)
    try:
        r = fleet.up(check=False)
        out = " ".join(r.stderr.split())  # recctl's errors are on stderr (rich wraps long lines)
        assert r.returncode == 1 and f"secret file {token} has mode 0644" in out, r.stderr
        assert not port_in_use(fleet.ports["control"])
        assert all(pid_alive(i[3]) for i in before)
        _serves(fleet)
    finally:
        token.chmod(0o600)
    fleet.up()
    fleet.reconnect()
    st = fleet.wait(all_healthy_exact, what="the fleet adopted again")
    assert [(i["id"], i["role"], i["state"], i["pid"]) for i in st["instances"]] == before
    _serves(fleet)
