"""Secret files (Triton admin key, control-plane bearer token): created once, 0600, read back."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def read_secret(path: Path) -> str:
    """Read or create a 0600 secret file; a file others could read is tightened before use."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
    os.chmod(path, 0o600)
    return path.read_text().strip()
