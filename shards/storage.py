"""Where shards live: any fsspec URL (local path, file://, s3://, gs://..., and fsspec's chained URLs such
as `simplecache::s3://bucket/set`), written atomically, and the one retry policy for reading and writing them.

Storage options describe the storage at the end of a chain (the bucket's endpoint and keys), as they do
without a chain; options for a layer in front of it go under the layer's name (`{"simplecache":
{"cache_storage": "/scratch/x"}}`), as fsspec takes them.

S3 endpoints and credentials come from the standard AWS_* variables (AWS_ENDPOINT_URL_S3 included)
or from explicit storage options; filesystem objects are made per call site, never shared across forks.
Whatever persists options (a checkpoint's recipe, a printed command line) passes them through
`redact` first, so a secret given in storage options is never written.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import time
import uuid
from dataclasses import dataclass
from typing import IO, Callable, Iterable, Iterator, TypeVar

import fsspec

log = logging.getLogger(__name__)
T = TypeVar("T")


def _s3_defaults(options: dict) -> dict:
    """s3fs does not read AWS_ENDPOINT_URL_S3 on every version: pass it explicitly. botocore tries each
    request once (unless the options say otherwise): Retry is the one policy that waits, and logs."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and "endpoint_url" not in options.get("client_kwargs", {}) and "endpoint_url" not in options:
        options = {**options, "client_kwargs": {**options.get("client_kwargs", {}), "endpoint_url": endpoint}}
    config = options.get("config_kwargs", {})
    if "retries" not in config:
        options = {**options, "config_kwargs": {**config, "retries": {"total_max_attempts": 1}}}
    return options


REDACTED = "<redacted>"
# Key names whose values are credentials: s3fs key/secret/token, botocore aws_secret_access_key and
# aws_session_token, gcsfs token, adlfs account_key/sas_token/connection_string, passwords.
_SECRET_WORDS = {"key", "secret", "token", "password", "passwd", "credential", "credentials", "authorization"}


def _is_secret(name) -> bool:
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", str(name)).lower().replace("-", "_").split("_")
    return bool(_SECRET_WORDS.intersection(words)) or "connection_string" in "_".join(words)


def redact(tree):
    """A copy of nested dicts and lists with the value of every secret-looking key, at any depth,
    replaced by REDACTED (empty values are kept: they hold nothing)."""
    if isinstance(tree, dict):
        return {k: REDACTED if _is_secret(k) and v not in (None, "") else redact(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [redact(v) for v in tree]
    return tree


def protocols(url: str) -> list[str]:
    """The protocols of a URL, outermost first: `simplecache::s3://b/x` -> ["simplecache", "s3"]; "file" for a path."""
    *layers, target = url.split("::")
    return [*layers, target.split("://", 1)[0] if "://" in target else "file"]


def _chain_options(url: str, options: dict) -> dict:
    """fsspec's keyword arguments for `url`: the options meant for its target storage moved under the
    target's name when the URL is a chain (fsspec gives unnamed options to the outermost layer)."""
    chain = protocols(url)
    layered = {k: v for k, v in options.items() if k in chain[:-1]}
    target = {k: v for k, v in options.items() if k not in chain[:-1]}
    if chain[-1] in ("s3", "s3a"):
        target = _s3_defaults(target)
    return {**layered, chain[-1]: target} if len(chain) > 1 else target


def filesystem(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a URL, a chained URL or a plain local path."""
    return fsspec.core.url_to_fs(url, **_chain_options(url, dict(storage_options or {})))


def is_local(url: str) -> bool:
    """A plain local path or file:// URL (a chained URL is not: its layers do the reading)."""
    return "::" not in url and ("://" not in url or url.startswith("file://"))


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


class _CountedReads:
    """A file whose reads each call on_fetch(bytes read); everything else is the file's own."""

    def __init__(self, file: IO[bytes], on_fetch: Callable[[int], None]):
        self._file, self._on_fetch = file, on_fetch

    def read(self, n: int = -1) -> bytes:
        data = self._file.read(n)
        self._on_fetch(len(data))
        return data

    def __getattr__(self, name: str):
        return getattr(self._file, name)

    def __enter__(self) -> "_CountedReads":
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()


def counted(file: IO[bytes], on_fetch: Callable[[int], None]) -> IO[bytes]:
    """`file` (opened for reading) with on_fetch(bytes) called for every request that reaches storage:
    each range an object store's file fetches beneath its read-ahead cache (one GET each), each read
    of any other file (a local one: a read call on the filesystem)."""
    if isinstance(file, fsspec.spec.AbstractBufferedFile):
        fetch = file.cache.fetcher

        def counting(start: int, end: int) -> bytes:
            data = fetch(start, end)
            on_fetch(len(data))
            return data

        file.cache.fetcher = counting
        return file
    return _CountedReads(file, on_fetch)


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


# Errors that retrying cannot fix: the object or bucket is missing (s3fs: NoSuchKey, NoSuchBucket) or
# forbidden (AccessDenied, InvalidAccessKeyId).
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def _network_errors() -> tuple[type[BaseException], ...]:
    """The connection errors of the S3 client stack, as s3fs lets them through, many not OSError:
    botocore's (EndpointConnectionError, ConnectionClosedError, ResponseStreamingError, and the
    timeouts) and aiohttp's (ServerDisconnectedError, ClientPayloadError, ...)."""
    found: list[type[BaseException]] = []
    try:
        from botocore.exceptions import ConnectionError, HTTPClientError
        found += [ConnectionError, HTTPClientError]
    except ImportError:  # no S3 support installed: nothing of botocore's can be raised either
        pass
    try:
        from aiohttp import ClientError
        found.append(ClientError)
    except ImportError:
        pass
    return tuple(found)


NETWORK = _network_errors()


def transient(error: BaseException) -> bool:
    """Whether retrying may cure a storage error: any OSError but PERMANENT (s3fs turns HTTP errors,
    5xx and SlowDown included, into OSError; timeouts are OSError too) and the client stack's
    connection errors (NETWORK)."""
    return isinstance(error, (OSError, *NETWORK)) and not isinstance(error, PERMANENT)


@dataclass(frozen=True)
class Retry:
    """How storage I/O is retried: transient errors (`transient`) up to `attempts` tries in all,
    sleeping `backoff` seconds before the first retry and twice as long before each next one, jittered
    by x0.5-1.5 so that workers that failed together do not retry together. Every retry is logged;
    giving up raises an OSError naming what was tried, caused by the last error. A permanent error
    is raised at once.

    The defaults wait 1 + 2 + ... + 64 = 127 s in all (at least 63 s after jitter), on top of the
    failed tries themselves, so a storage server restarting for a minute costs a pause, not the run.
    Each try is bounded in turn: s3fs makes 5 attempts 0.1-0.8 s apart (botocore's own retries are
    off, see _s3_defaults) with 5 s connect and 15 s read timeouts: about 2 s when nothing listens,
    at most 77 s against a server that accepts connections but never answers."""
    attempts: int = 8
    backoff: float = 1.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.backoff < 0:
            raise ValueError(f"retry: attempts {self.attempts} must be >= 1 and backoff {self.backoff} >= 0")

    def call(self, action: Callable[[], T], what: str, on_retry: Callable[[], None] | None = None) -> T:
        """action(), retried; on_retry() is called before each retry (a counter, say)."""
        for attempt in range(1, self.attempts + 1):
            try:
                return action()
            except Exception as e:
                self._wait(e, attempt, what)
                if on_retry:
                    on_retry()
        raise AssertionError("unreachable")

    def iterate(self, items: Callable[[], Iterable[T]], what: str) -> Iterator[T]:
        """The items of items(); a transient error starts it again and resumes after the items already
        given, so a consumer sees each item once (a sequential read of a shard, say)."""
        given, attempt = 0, 1
        while True:
            try:
                for i, item in enumerate(items()):
                    if i == given:
                        given += 1
                        yield item
                return
            except Exception as e:
                self._wait(e, attempt, what)
                attempt += 1

    def _wait(self, error: Exception, attempt: int, what: str) -> None:
        """Sleep before the next attempt, or raise: an error not transient at once, any after the last attempt."""
        if not transient(error):
            raise error
        if attempt >= self.attempts:
            raise OSError(f"{what}: gave up after {attempt} attempts: {error}") from error
        delay = self.backoff * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)
        log.warning("%s: %s; attempt %d/%d failed, retrying in %.2f s", what, error, attempt, self.attempts, delay)
        time.sleep(delay)
