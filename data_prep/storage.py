"""Where shards go: a local directory or ``s3://bucket/prefix`` (boto3).

Objects only ever appear whole: a local file is written under a temporary name and renamed;
an S3 object becomes visible when its upload completes. Credentials and the endpoint come
from the usual environment (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL`` ...) and are never
logged.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class LocalStorage:
    def __init__(self, root: str):
        self.root = Path(root)
        self.url = str(self.root)

    def check(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def exists(self, name: str) -> bool:
        return (self.root / name).is_file()

    def get_bytes(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def sha256(self, name: str) -> str:
        return sha256_file(self.root / name)

    def put_file(self, name: str, local: str | Path) -> None:
        dest = self.root / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        shutil.copyfile(local, tmp)
        os.replace(tmp, dest)

    def put_bytes(self, name: str, data: bytes) -> None:
        dest = self.root / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, dest)

    def shard_url(self, name: str) -> str:
        return str(self.root / name)

    def list(self, prefix: str = "") -> list[str]:
        """Names of the files under ``prefix`` (recursive), relative to the root, sorted."""
        base = self.root / prefix if prefix else self.root
        if not base.is_dir():
            return []
        return sorted(str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file())

    def get_file(self, name: str, local: str | Path) -> None:
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.root / name, local)

    def delete(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        """Removes a folder (or file) and everything in it."""
        target = self.root / prefix
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


class S3Storage:
    def __init__(self, url: str):
        rest = url[len("s3://"):]
        self.bucket, _, prefix = rest.partition("/")
        if not self.bucket:
            raise ValueError(f"no bucket in S3 URL {url!r}")
        self.prefix = prefix.strip("/")
        self.url = url

    @property
    def client(self):
        import boto3  # endpoint and credentials from the environment

        return boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def check(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as err:
            raise ConnectionError(f"cannot reach bucket {self.bucket!r} ({type(err).__name__}: {err})") from err

    def exists(self, name: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(name))
            return True
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def get_bytes(self, name: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read()

    def sha256(self, name: str) -> str:
        h = hashlib.sha256()
        body = self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"]
        for block in iter(lambda: body.read(1 << 20), b""):
            h.update(block)
        return h.hexdigest()

    def put_file(self, name: str, local: str | Path) -> None:
        self.client.upload_file(str(local), self.bucket, self._key(name))

    def put_bytes(self, name: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data)

    def shard_url(self, name: str) -> str:
        return f"s3://{self.bucket}/{self._key(name)}"

    def list(self, prefix: str = "") -> list[str]:
        """Names of the objects under ``prefix``, relative to this storage's prefix, sorted."""
        root = f"{self.prefix}/" if self.prefix else ""
        names = []
        for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=root + (prefix.rstrip("/") + "/" if prefix else "")):
            names += [o["Key"][len(root):] for o in page.get("Contents", [])]
        return sorted(names)

    def get_file(self, name: str, local: str | Path) -> None:
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        self.client.download_file(self.bucket, self._key(name), str(local))

    def delete(self, name: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(name))

    def delete_prefix(self, prefix: str) -> None:
        """Removes every object under ``prefix``."""
        names = self.list(prefix)
        client = self.client
        for i in range(0, len(names), 1000):
            client.delete_objects(Bucket=self.bucket, Delete={
                "Objects": [{"Key": self._key(n)} for n in names[i:i + 1000]], "Quiet": True})


def open_storage(url: str) -> LocalStorage | S3Storage:
    return S3Storage(url) if url.startswith("s3://") else LocalStorage(url)
