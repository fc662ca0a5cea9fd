"""Optional TLS for the control API: server credentials from files (checked before anything starts) and the one
way every client (recctl, tests) opens a channel to the control plane."""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from recserve.control.keys import SecretFileError, check_private


class TlsConfigError(ValueError):
    """A TLS setting that cannot work; the message names the flag or file and the rule."""


@dataclass(frozen=True)
class ServerTls:
    cert: Path
    key: Path
    ca: Path  # what clients should trust: a CA file, or the (self-signed) certificate itself

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key.read_bytes(), self.cert.read_bytes())])


def server_tls(cert: Path | None, key: Path | None, ca: Path | None = None) -> ServerTls | None:
    """Validate ``--tls-cert``/``--tls-key`` (both or neither; a private key file, a matching pair) up front, so a
    bad file is a clear refusal at start and not a silent handshake failure later."""
    if cert is None and key is None:
        if ca is not None:
            raise TlsConfigError("--tls-ca needs --tls-cert and --tls-key")
        return None
    if cert is None or key is None:
        raise TlsConfigError("--tls-cert and --tls-key go together (the server certificate and its private key)")
    for flag, path in (("--tls-cert", cert), ("--tls-key", key), ("--tls-ca", ca)):
        if path is not None and not path.is_file():
            raise TlsConfigError(f"{flag} {path}: no such file")
    try:
        check_private(key)
    except SecretFileError as exc:
        raise TlsConfigError(f"--tls-key: {exc}") from None
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, ValueError) as exc:
        raise TlsConfigError(f"--tls-cert {cert} / --tls-key {key}: not a PEM certificate and its matching "
                             f"private key ({exc})") from None
    return ServerTls(cert.resolve(), key.resolve(), (ca or cert).resolve())


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def control_channel(address: str, tls: bool = False, ca: Path | None = None) -> grpc.Channel:
    """A channel to the control plane: plaintext, or TLS trusting ``ca`` (the system roots when it is None)."""
    if not tls and ca is None:
        return grpc.insecure_channel(address)
    roots = Path(ca).read_bytes() if ca is not None else None
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=roots))
