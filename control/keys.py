"""Secret files (Triton admin key, control-plane bearer token, TLS private key): created 0600, checked, read back."""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
from pathlib import Path


class SecretFileError(RuntimeError):
    """A secret file others could read (or that cannot be read): refuse to use it, never tighten it silently."""


def check_private(path: Path) -> None:
    """Refuse a secret file that group or other may read or write: it may already have leaked, and fixing the
    mode quietly would hide that. The message names the file, its mode and the fix."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError as exc:
        raise SecretFileError(f"cannot read secret file {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise SecretFileError(
            f"secret file {path} has mode {mode:04o}: group/other may read it (must be 0600 or stricter); "
            f"if it may have leaked, delete it to get a new one, else run: chmod 600 {path}")


def read_secret(path: Path) -> str:
    """Read or create a 0600 secret file; one that others could read is refused (``SecretFileError``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
    check_private(path)
    return path.read_text().strip()


def new_secret(path: Path) -> str:
    """A fresh secret in ``path`` (0600), replacing any earlier one: written to a private temporary file in the same
    folder, then renamed over the old one, so no reader ever sees a partial key or a group-readable file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(32)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)
    os.replace(tmp, path)
    return value


def read_existing_secret(path: Path) -> str | None:
    """The secret in ``path`` when the file exists (checked like ``read_secret``), else None; never creates one."""
    if not path.exists():
        return None
    check_private(path)
    return path.read_text().strip() or None


def fingerprint(secret: str | bytes) -> str:
    """A short, non-reversible name for a secret (or a presented credential) that logs may carry."""
    data = secret.encode("utf-8", "surrogateescape") if isinstance(secret, str) else secret
    return "sha256:" + hashlib.sha256(data).hexdigest()[:12]
