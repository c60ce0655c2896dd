"""Where shards live: any fsspec URL (local path, file://, s3://, gs://...), written atomically.

S3 endpoints and credentials come from the standard AWS_* variables (AWS_ENDPOINT_URL_S3 included)
or from explicit storage options; filesystem objects are made per call site, never shared across forks.
"""
from __future__ import annotations

import contextlib
import json
import os
import uuid
from typing import IO, Iterator

import fsspec


def _s3_defaults(options: dict) -> dict:
    """s3fs does not read AWS_ENDPOINT_URL_S3 on every version: pass it explicitly."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and "endpoint_url" not in options.get("client_kwargs", {}) and "endpoint_url" not in options:
        options = {**options, "client_kwargs": {**options.get("client_kwargs", {}), "endpoint_url": endpoint}}
    return options


def filesystem(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a URL or a plain local path."""
    options = dict(storage_options or {})
    if url.startswith(("s3://", "s3a://")):
        options = _s3_defaults(options)
    fs, path = fsspec.core.url_to_fs(url, **options)
    return fs, path


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def join(url: str, *names: str) -> str:
    return "/".join([url.rstrip("/"), *names])


@contextlib.contextmanager
def open_atomic(url: str, storage_options: dict | None = None) -> Iterator[IO[bytes]]:
    """Write to URL so that it appears whole or not at all.

    Local files go to a temporary name and are renamed; object stores publish an object only when
    its upload completes, so writing in place is already atomic there.
    """
    fs, path = filesystem(url, storage_options)
    if is_local(url):
        fs.makedirs(fs._parent(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        with fs.open(path, "wb") as f:
            yield f


def write_bytes(url: str, data: bytes, storage_options: dict | None = None) -> None:
    with open_atomic(url, storage_options) as f:
        f.write(data)


def read_bytes(url: str, storage_options: dict | None = None) -> bytes:
    fs, path = filesystem(url, storage_options)
    with fs.open(path, "rb") as f:
        return f.read()


def write_json(url: str, obj, storage_options: dict | None = None) -> None:
    write_bytes(url, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode(), storage_options)


def read_json(url: str, storage_options: dict | None = None):
    return json.loads(read_bytes(url, storage_options))


def exists(url: str, storage_options: dict | None = None) -> bool:
    fs, path = filesystem(url, storage_options)
    return fs.exists(path)
