"""The S3 store (MinIO in deployment; any S3-compatible server) through the minio SDK.

Everything about the connection comes from the environment, never from code
or config files, and credentials never reach a log or an error message:

- ``AWS_ENDPOINT_URL`` (or ``VIDALIGN_S3_ENDPOINT``): e.g. ``http://minio:9000``;
  the scheme decides TLS. Unset: AWS S3 over TLS.
- ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` (and ``AWS_SESSION_TOKEN``).
- ``AWS_REGION`` (or ``AWS_DEFAULT_REGION``), default ``us-east-1``.
- ``VIDALIGN_S3_RETRIES`` (default 5): retries of a transient failure, with
  jittered exponential backoff from 0.5 s.

Uploads stream from disk in multipart parts; downloads stream to a temporary
file; ranged reads fetch only the bytes asked for.
"""

from __future__ import annotations

import io
import os
import random
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

import urllib3
from minio import Minio
from minio.error import S3Error

from vidalign.errors import InvalidInput, NotFound, Unauthenticated, Unavailable, VidalignError
from vidalign.log import get_logger
from vidalign.store.base import Store, safe_key

log = get_logger(__name__)

T = TypeVar("T")

PART_SIZE = 16 << 20
"""Multipart part size: memory per upload is bounded by a few parts."""

_AUTH_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken",
               "ExpiredToken"}
_MISSING_CODES = {"NoSuchKey", "NoSuchObject"}
_TRANSIENT_CODES = {"InternalError", "SlowDown", "ServiceUnavailable", "RequestTimeout",
                    "RequestTimeTooSkewed", "OperationAborted"}


def endpoint_from_env() -> tuple[str, bool]:
    """(host[:port], secure) from AWS_ENDPOINT_URL / VIDALIGN_S3_ENDPOINT."""
    raw = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("VIDALIGN_S3_ENDPOINT")
    if not raw:
        return "s3.amazonaws.com", True
    parsed = urlparse(raw if "://" in raw else f"https://{raw}")
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise InvalidInput(f"AWS_ENDPOINT_URL={raw!r}: expected http(s)://host[:port]")
    return parsed.netloc, parsed.scheme == "https"


class S3Store(Store):
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client: Minio | None = None,
        endpoint: str | None = None,
        retries: int | None = None,
    ) -> None:
        if not bucket:
            raise InvalidInput("s3 URI has no bucket: expected s3://bucket[/prefix]")
        self.bucket = bucket
        self.prefix = safe_key(prefix) if prefix else ""
        self.uri = f"s3://{bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.retries = int(os.environ.get("VIDALIGN_S3_RETRIES", "5")) if retries is None else retries
        if client is None:
            host, secure = endpoint_from_env()
            self.endpoint = f"{'https' if secure else 'http'}://{host}"
            client = Minio(
                host,
                access_key=os.environ.get("AWS_ACCESS_KEY_ID"),
                secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
                session_token=os.environ.get("AWS_SESSION_TOKEN"),
                secure=secure,
                region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
                # Our retry loop decides; urllib3's own retries would hide a dead server for minutes.
                http_client=urllib3.PoolManager(
                    timeout=urllib3.Timeout(connect=5.0, read=120.0),
                    retries=urllib3.Retry(total=0, redirect=0),
                    maxsize=8,
                ),
            )
        else:
            self.endpoint = endpoint or "(injected client)"
        self.client = client

    def _child(self, prefix: str) -> S3Store:
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        return S3Store(self.bucket, full, client=self.client, endpoint=self.endpoint,
                       retries=self.retries)

    def _name(self, key: str) -> str:
        key = safe_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, key: str, fn: Callable[[], T]) -> T:
        """Run one S3 call, retrying transient failures; map errors to vidalign's."""
        where = f"{self.uri}/{key}" if key else self.uri
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except S3Error as err:
                if err.code in _MISSING_CODES:
                    raise NotFound(f"{where} does not exist") from None
                if err.code == "NoSuchBucket":
                    raise NotFound(
                        f"bucket '{self.bucket}' does not exist at {self.endpoint}; create it "
                        "(e.g. `mc mb`) or fix the URI"
                    ) from None
                if err.code in _AUTH_CODES:
                    raise Unauthenticated(
                        f"{self.endpoint} rejected the credentials for {what} {where} ({err.code}); "
                        "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
                    ) from None
                if err.code not in _TRANSIENT_CODES or attempt == self.retries:
                    raise VidalignError(f"S3 {what} {where} failed: {err.code}: {err.message}") from None
                reason = err.code
            except (urllib3.exceptions.HTTPError, OSError) as err:
                if attempt == self.retries:
                    raise Unavailable(
                        f"cannot reach S3 at {self.endpoint} for {what} {where} after "
                        f"{self.retries + 1} attempts: {type(err).__name__}"
                    ) from None
                reason = type(err).__name__
            delay = min(8.0, 0.5 * 2**attempt) * (0.5 + random.random())
            log.warning("s3_retry", op=what, key=where, attempt=attempt + 1, reason=reason,
                        delay_s=round(delay, 2))
            time.sleep(delay)
        raise AssertionError("unreachable")

    def put_file(self, key: str, path: str | Path) -> None:
        name = self._name(key)
        self._call("upload", key, lambda: self.client.fput_object(
            self.bucket, name, str(path), part_size=PART_SIZE))

    def put_bytes(self, key: str, data: bytes) -> None:
        name = self._name(key)
        self._call("upload", key, lambda: self.client.put_object(
            self.bucket, name, io.BytesIO(data), len(data)))

    def get_file(self, key: str, path: str | Path) -> None:
        name = self._name(key)
        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            self._call("download", key, lambda: self.client.fget_object(
                self.bucket, name, str(tmp)))
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def _read(self, name: str, offset: int = 0, length: int = 0) -> bytes:
        response = self.client.get_object(self.bucket, name, offset=offset, length=length)
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    def get_bytes(self, key: str) -> bytes:
        name = self._name(key)
        return self._call("download", key, lambda: self._read(name))

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        name = self._name(key)
        return self._call("ranged read", key, lambda: self._read(name, offset, length))

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
            return True
        except NotFound:
            return False

    def size(self, key: str) -> int:
        name = self._name(key)
        return self._call("stat", key, lambda: self.client.stat_object(self.bucket, name).size)

    def list(self, prefix: str = "") -> list[str]:
        base = self._name(prefix) if prefix else self.prefix
        start = f"{base}/" if base else ""
        strip = len(f"{self.prefix}/") if self.prefix else 0

        def fetch() -> list[str]:
            objects = self.client.list_objects(self.bucket, prefix=start, recursive=True)
            return [o.object_name[strip:] for o in objects if not o.is_dir]

        keys = self._call("list", prefix, fetch)
        if prefix and not keys and self.exists(prefix):
            return [safe_key(prefix)]
        return sorted(keys)

    def delete(self, key: str) -> None:
        name = self._name(key)
        self._call("delete", key, lambda: self.client.remove_object(self.bucket, name))
