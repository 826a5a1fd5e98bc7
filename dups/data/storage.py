"""Where shards go: a local directory or ``s3://bucket/prefix`` (boto3).

Objects only ever appear whole: a local file is written under a temporary name and renamed;
an S3 object becomes visible when its upload completes. Credentials and the endpoint come
from the usual environment (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL`` ...) and are never
logged.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import time
from pathlib import Path

log = logging.getLogger("dups.storage")


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

    def holds(self, name: str, sha256: str, nbytes: int) -> bool:
        """Whether the file ``name`` is the one with this digest and size (read through)."""
        path = self.root / name
        return path.is_file() and path.stat().st_size == nbytes and sha256_file(path) == sha256

    def put_file(self, name: str, local: str | Path, sha256: str | None = None) -> None:
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


def transport_errors() -> tuple[type[Exception], ...]:
    """botocore's errors of the connection, not of the request: a dropped, stalled or refused
    connection, a body cut short. Asking again can succeed."""
    from botocore.exceptions import ConnectionError, HTTPClientError, IncompleteReadError

    return (HTTPClientError, ConnectionError, IncompleteReadError)


class ResumableRead(io.RawIOBase):
    """One S3 object read front to back that outlives a dropped or stalled connection: on a
    transport error it asks again from the byte it had reached (a ``Range`` request pinned to
    the object's ETag, so a replaced object is an error, never a splice of two), at most
    ``retries`` times in a row, waiting ``backoff`` (0.5 s), then 1 s, 2 s ... between."""

    retries = 5
    backoff = 0.5

    def __init__(self, client, bucket: str, key: str, start: int = 0):
        super().__init__()
        self.client, self.bucket, self.key = client, bucket, key
        self.offset, self.etag, self.body = start, None, None
        self.reopened = 0  # how many times a transport error was got past
        self._read_with_retries(0)  # the first request's errors show here, not at the first read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def read(self, size: int = -1) -> bytes:
        return self._read_with_retries(size)

    def _open(self) -> None:
        from botocore.exceptions import ClientError

        ask = {"Bucket": self.bucket, "Key": self.key}
        if self.offset:
            ask["Range"] = f"bytes={self.offset}-"
        if self.etag:
            ask["IfMatch"] = self.etag
        try:
            response = self.client.get_object(**ask)
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
                raise ValueError(f"s3://{self.bucket}/{self.key} was replaced while being read "
                                 f"(at byte {self.offset})") from err
            raise
        self.etag = self.etag or response.get("ETag")
        self.body = response["Body"]

    def _read_with_retries(self, size: int) -> bytes:
        for attempt in range(self.retries + 1):
            try:
                if self.body is None:
                    self._open()
                data = self.body.read(None if size is None or size < 0 else size) if size else b""
                self.offset += len(data)
                return data
            except transport_errors() as err:
                self.body = None
                if attempt == self.retries:
                    raise OSError(f"s3://{self.bucket}/{self.key}: {attempt + 1} transport errors in a "
                                  f"row at byte {self.offset} ({type(err).__name__}: {err})") from err
                wait = self.backoff * 2 ** attempt
                log.warning("s3://%s/%s: %s at byte %d; asking again from there in %.1f s (%d/%d)",
                            self.bucket, self.key, type(err).__name__, self.offset, wait,
                            attempt + 1, self.retries)
                time.sleep(wait)
                self.reopened += 1
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.body is not None:
            self.body.close()
            self.body = None
        super().close()


class S3Storage:
    read_timeout = 60.0  # seconds without a byte before a read counts as stalled (botocore's default)

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
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None,
                            config=Config(read_timeout=self.read_timeout))

    def open_read(self, name: str = "", start: int = 0) -> ResumableRead:
        """The object ``name`` (this URL itself if empty) from byte ``start`` on, as a stream
        that survives transport errors."""
        return ResumableRead(self.client, self.bucket, self._key(name) if name else self.prefix, start)

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

    def holds(self, name: str, sha256: str, nbytes: int) -> bool:
        """Whether the object ``name`` is the one with this digest and size: from the digest
        stored with it at upload (one HEAD request, nothing downloaded), else read through."""
        from botocore.exceptions import ClientError

        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(name))
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        if head["ContentLength"] != nbytes:
            return False
        stored = head.get("Metadata", {}).get("sha256")
        if stored:
            return stored == sha256
        h = hashlib.sha256()  # an object uploaded without its digest
        with self.open_read(name) as body:
            for block in iter(lambda: body.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest() == sha256

    def put_file(self, name: str, local: str | Path, sha256: str | None = None) -> None:
        """Uploads ``local``; ``sha256``: its digest, stored with the object (``holds`` reads it)."""
        extra = {"Metadata": {"sha256": sha256}} if sha256 else None
        self.client.upload_file(str(local), self.bucket, self._key(name), ExtraArgs=extra)

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
            names += [o["Key"][len(root):] for o in page.get("Contents", [])
                      if not o["Key"].endswith("/")]  # (folder markers, as pyarrow's S3 writes)
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
