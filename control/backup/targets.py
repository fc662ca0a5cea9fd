"""Where backups live: a directory (a mounted volume) or an S3-compatible bucket, behind one small interface.

Why one interface: the backup, verification, retention and restore code is the same for both kinds, and a
restore on a new machine only needs the target's address. Keys are ``/``-separated relative names such as
``objects/ab/<sha256>`` and ``backups/<id>.json``. S3 goes through boto3 (credentials from boto3's usual chain:
environment, shared config; never from the policy file).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path


class TargetError(ValueError):
    """A target that is refused (names the field and the rule) or cannot be reached."""


@dataclass(frozen=True)
class TargetSpec:
    """``path`` for a directory target, or ``url`` ``s3://bucket[/prefix]`` (+ ``endpoint_url``, ``region``)."""

    path: Path | None = None
    url: str = ""
    endpoint_url: str | None = None
    region: str = "us-east-1"

    def describe(self) -> str:
        if self.path is not None:
            return str(self.path)
        return self.url + (f" (endpoint {self.endpoint_url})" if self.endpoint_url else "")


def parse_target(address: str, endpoint_url: str | None = None, region: str = "us-east-1") -> TargetSpec:
    """``s3://bucket/prefix`` or a filesystem path (what ``recctl restore --from`` takes)."""
    if address.startswith("s3://"):
        bucket = address[5:].split("/", 1)[0]
        if not bucket:
            raise TargetError(f"target {address!r}: s3:// URL has no bucket (s3://BUCKET[/PREFIX])")
        return TargetSpec(url=address.rstrip("/"), endpoint_url=endpoint_url, region=region)
    if "://" in address:
        raise TargetError(f"target {address!r}: only a path or an s3:// URL is supported")
    return TargetSpec(path=Path(address).resolve())


def refuse_inside(spec: TargetSpec, field_name: str, **protected: Path | None) -> None:
    """A path target inside (or equal to) the runtime root or the repository dies with them: refuse it."""
    if spec.path is None:
        return
    p = spec.path.resolve()
    for name, root in protected.items():
        if root is None:
            continue
        r = Path(root).resolve()
        if p == r or r in p.parents or p in r.parents:
            raise TargetError(f"{field_name}: {p} is inside or contains the {name.replace('_', ' ')} {r}; a backup "
                              "target must be off the runtime directory and the repository (another volume)")


class PathStore:
    """A directory target; writes are atomic (temp file + rename), so a crash never leaves half an object."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def describe(self) -> str:
        return str(self.root)

    def _p(self, key: str) -> Path:
        return self.root / key

    def exists(self, key: str) -> bool:
        return self._p(key).is_file()

    def put_file(self, key: str, src: Path) -> None:
        dst = self._p(key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=".put-")
        os.close(fd)
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)

    def put_bytes(self, key: str, data: bytes) -> None:
        dst = self._p(key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=".put-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, dst)

    def get_file(self, key: str, dest: Path) -> None:
        if not self.exists(key):
            raise TargetError(f"{self.root}: {key} is missing")
        shutil.copyfile(self._p(key), dest)

    def get_bytes(self, key: str) -> bytes:
        if not self.exists(key):
            raise TargetError(f"{self.root}: {key} is missing")
        return self._p(key).read_bytes()

    def list(self, prefix: str) -> list[str]:
        base = self._p(prefix)
        if not base.is_dir():
            return []
        return sorted(str(p.relative_to(self.root)) for p in base.rglob("*")
                      if p.is_file() and not p.name.startswith(".put-"))

    def delete(self, key: str) -> None:
        self._p(key).unlink(missing_ok=True)


class S3Store:
    """An S3-compatible bucket (AWS, MinIO, Ceph RGW, ...) through boto3; the bucket must exist."""

    def __init__(self, spec: TargetSpec):
        import boto3
        from botocore.config import Config

        rest = spec.url[5:]
        self.bucket, _, prefix = rest.partition("/")
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.spec = spec
        self.client = boto3.client("s3", endpoint_url=spec.endpoint_url, region_name=spec.region,
                                   config=Config(retries={"max_attempts": 3}, connect_timeout=5, read_timeout=30))

    def describe(self) -> str:
        return self.spec.describe()

    def _k(self, key: str) -> str:
        return self.prefix + key

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._k(key))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise TargetError(f"{self.describe()}: {key}: {exc}") from exc

    def put_file(self, key: str, src: Path) -> None:
        self.client.upload_file(str(src), self.bucket, self._k(key))

    def put_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data)

    def get_file(self, key: str, dest: Path) -> None:
        dest.write_bytes(self.get_bytes(key))

    def get_bytes(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._k(key))["Body"].read()
        except ClientError as exc:
            raise TargetError(f"{self.describe()}: {key}: {exc}") from exc

    def list(self, prefix: str) -> list[str]:
        out = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                          Prefix=self._k(prefix)):
            out += [o["Key"][len(self.prefix):] for o in page.get("Contents", [])]
        return sorted(out)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._k(key))


Store = PathStore | S3Store


def open_store(spec: TargetSpec) -> Store:
    return PathStore(spec.path) if spec.path is not None else S3Store(spec)
