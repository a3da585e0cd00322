"""URLs for everything that touches storage: local paths, file://, s3://, or any fsspec URL.

S3 settings come from the environment unless given explicitly:

* ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (read by botocore itself),
* ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` for a non-AWS server (MinIO, SeaweedFS, ...),
* ``AWS_REGION`` / ``AWS_DEFAULT_REGION``.

Credentials are never logged: use :func:`redact` before printing or saving options.

Object stores have outages. Every call on a remote filesystem returned by :func:`filesystem`
(and every read of a file it opens) is retried with exponential backoff while the error is
transient: connection refused/reset, timeouts, throttling (503 SlowDown, 429) and other 5xx
answers. The first failure of an outage is logged once per process, and so is the recovery.
An outage longer than ``$GOEMBED_STORAGE_RETRY_S`` seconds (default 300; the trainer sets it
from ``data.storage_retry_seconds``) raises :class:`StorageUnavailableError`, which is not an
``OSError`` on purpose: the reader skips damaged shards on ``OSError`` but must stop on an outage.
Remote writes are spooled to a local temporary file and uploaded, with retries, on ``close()``:
an object is either fully written or not written at all.
"""

from __future__ import annotations

import functools
import glob
import io
import logging
import os
import posixpath
import random
import tempfile
import threading
import time
from typing import Any

import fsspec
from braceexpand import braceexpand

_SECRET_WORDS = ("secret", "password", "token", "key", "credential")

# One filesystem per (process, protocol, options): s3fs objects must not cross a fork (their
# aiohttp loop belongs to the parent), so the cache is keyed by pid.
_FILESYSTEMS: dict[tuple, Any] = {}
_CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")

log = logging.getLogger("data_pipeline.storage")

RETRY_ENV = "GOEMBED_STORAGE_RETRY_S"
DEFAULT_RETRY_SECONDS = 300.0
_BACKOFF_FIRST_S, _BACKOFF_MAX_S = 0.25, 8.0
# S3 error codes and HTTP statuses that mean "try again later", not "you asked for something wrong"
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                    "ServiceUnavailable", "InternalError", "RequestLimitExceeded", "TooManyRequests", "503", "500"}


class StorageUnavailableError(RuntimeError):
    """Object storage stayed unreachable (or throttling) for longer than the retry bound."""


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def is_local(url: str) -> bool:
    return protocol_of(url) == "file"


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def default_storage_options(url: str) -> dict:
    """Options for fsspec taken from the environment (only S3 needs any)."""
    if protocol_of(url) not in ("s3", "s3a"):
        return {}
    options: dict = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["endpoint_url"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options.setdefault("client_kwargs", {})["region_name"] = region
    return options


def retry_seconds() -> float:
    """How long an outage may last before a storage call gives up (``$GOEMBED_STORAGE_RETRY_S``)."""
    try:
        return float(os.environ.get(RETRY_ENV, DEFAULT_RETRY_SECONDS))
    except ValueError:
        raise ValueError(f"${RETRY_ENV} must be a number of seconds, got {os.environ[RETRY_ENV]!r}") from None


def set_retry_seconds(seconds: float) -> None:
    """Set the outage bound for this process and every process it starts (loader workers, ranks)."""
    os.environ[RETRY_ENV] = repr(float(seconds))


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` (or anything in its cause/context chain) is worth retrying."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                              FileExistsError, StorageUnavailableError)):
            return False  # an answer, not an outage (s3fs turns 404/403 into these)
        if isinstance(error, (ConnectionError, TimeoutError)):  # refused, reset, aborted; socket timeouts
            return True
        name = type(error).__name__
        if name in ("EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
                    "ProxyConnectionError", "HTTPClientError", "IncompleteRead", "ResponseStreamingError",
                    "FSTimeoutError", "ClientConnectionError", "ClientConnectorError", "ServerDisconnectedError",
                    "ClientPayloadError", "ClientOSError", "ServerTimeoutError", "ProtocolError"):
            return True
        response = getattr(error, "response", None)  # botocore ClientError
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            return code in _TRANSIENT_CODES or status >= 500 or status == 429
        error = error.__cause__ or error.__context__
    return False


class _Outage:
    """Per-process state of the current outage, so that it is logged once, not once per call."""

    def __init__(self):
        self.lock = threading.Lock()
        self.since: float | None = None
        self.failures = 0

    def failed(self, what: str, error: BaseException) -> float:
        """Record a transient failure; the seconds the outage has lasted."""
        now = time.monotonic()
        with self.lock:
            if self.since is None or os.getpid() != getattr(self, "pid", None):
                self.since, self.failures, self.pid = now, 0, os.getpid()
                log.warning("object storage unreachable (%s: %s: %s); retrying with backoff for up to %gs "
                            "(%s)", what, type(error).__name__, _one_line(error), retry_seconds(), RETRY_ENV)
            self.failures += 1
            return now - self.since

    def recovered(self) -> None:
        if self.since is None:
            return
        with self.lock:
            if self.since is not None:
                log.warning("object storage reachable again after %.1fs (%d failed attempts)",
                            time.monotonic() - self.since, self.failures)
                self.since = None


_OUTAGE = _Outage()


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300]


def call_with_retry(function, what: str, *args, **kwargs):
    """``function(*args, **kwargs)``, retried with jittered exponential backoff on transient errors."""
    attempt = 0
    while True:
        try:
            result = function(*args, **kwargs)
        except Exception as error:
            if not is_transient(error):
                raise
            lasted, bound = _OUTAGE.failed(what, error), retry_seconds()
            if lasted >= bound:
                raise StorageUnavailableError(
                    f"object storage unreachable for {lasted:.0f}s (the bound is {bound:g}s: data.storage_retry_seconds "
                    f"or ${RETRY_ENV}); last error on {what}: {type(error).__name__}: {_one_line(error)}") from error
            delay = min(_BACKOFF_MAX_S, _BACKOFF_FIRST_S * 2 ** attempt) * random.uniform(0.5, 1.0)
            time.sleep(min(delay, max(0.05, bound - lasted)))
            attempt += 1
            continue
        _OUTAGE.recovered()
        return result


class RetryingFileSystem:
    """An fsspec filesystem whose calls are retried through outages (see the module docstring).

    Attribute access is passed through, so it can be used wherever the wrapped filesystem is."""

    def __init__(self, fs, protocol: str):
        self.fs, self.protocol_name = fs, protocol

    def __getattr__(self, name: str):
        attribute = getattr(self.fs, name)
        if name.startswith("_") or not callable(attribute):
            return attribute

        @functools.wraps(attribute)
        def retried(*args, **kwargs):
            what = f"{name} {self.protocol_name}://{args[0]}" if args and isinstance(args[0], str) else name
            return call_with_retry(attribute, what, *args, **kwargs)

        return retried

    def open(self, path: str, mode: str = "rb", **kwargs):
        binary = mode.replace("t", "") if "b" in mode else mode.replace("t", "") + "b"
        if binary in ("rb",):
            raw = _RetryingReader(self.fs, path, f"{self.protocol_name}://{path}", kwargs)
            f = io.BufferedReader(raw, buffer_size=1 << 20)
        elif binary in ("wb", "xb"):
            f = _UploadOnClose(self.fs, path, f"{self.protocol_name}://{path}")
        else:
            return call_with_retry(self.fs.open, f"open {path}", path, mode, **kwargs)
        return f if "b" in mode else io.TextIOWrapper(f, encoding=kwargs.get("encoding") or "utf-8")


class _RetryingReader(io.RawIOBase):
    """A remote file read through outages: a failed read reopens the object and seeks back."""

    def __init__(self, fs, path: str, url: str, open_kwargs: dict):
        self.fs, self.path, self.url, self.open_kwargs = fs, path, url, open_kwargs
        self.position = 0
        self.file = call_with_retry(fs.open, f"open {url}", path, "rb", **open_kwargs)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.position = call_with_retry(self._seek, f"seek {self.url}", offset, whence)
        return self.position

    def _seek(self, offset: int, whence: int) -> int:
        if self.file is None:
            self._reopen()
        return self.file.seek(offset, whence)

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def _read(self, size: int) -> bytes:
        if self.file is None:
            self._reopen()
        try:
            return self.file.read(size)
        except Exception:
            self._discard()  # a connection broken mid-read: the next attempt starts from a fresh file
            raise

    def _reopen(self) -> None:
        self.file = self.fs.open(self.path, "rb", **self.open_kwargs)
        self.file.seek(self.position)

    def _discard(self) -> None:
        try:
            self.file.close()
        except Exception:
            pass
        self.file = None

    def read(self, size: int = -1) -> bytes:
        data = call_with_retry(self._read, f"read {self.url}", -1 if size is None or size < 0 else size)
        self.position += len(data)
        return data

    def close(self) -> None:
        if self.file is not None:
            self._discard()
        super().close()


class _UploadOnClose(io.RawIOBase):
    """A remote file being written: bytes go to a local temporary file, uploaded (with retries) on
    ``close()``. Leaving a ``with`` block by an exception uploads nothing."""

    def __init__(self, fs, path: str, url: str):
        self.fs, self.path, self.url = fs, path, url
        self.spool = tempfile.NamedTemporaryFile(prefix="goembed-upload-", delete=False)
        self.failed = False

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        return self.spool.write(data)

    def tell(self) -> int:  # tarfile asks where it is
        return self.spool.tell()

    def __del__(self):
        # Garbage-collected without close(): the writer failed somewhere. Publish nothing (and do not
        # start network calls at interpreter exit).
        self.failed = True
        try:
            self.close()
        except Exception:
            pass

    def __exit__(self, kind, value, traceback):
        self.failed = kind is not None
        return super().__exit__(kind, value, traceback)

    def close(self) -> None:
        if self.closed:
            return
        if not hasattr(self, "spool"):  # __init__ failed
            return
        try:
            self.spool.close()
            if not self.failed:
                call_with_retry(self.fs.put_file, f"upload {self.url}", self.spool.name, self.path)
        finally:
            os.unlink(self.spool.name)
            super().close()


def filesystem(url: str, storage_options: dict | None = None):
    """(fsspec filesystem, path inside it) for a URL, cached per process. Remote filesystems come
    wrapped in :class:`RetryingFileSystem`."""
    options = {**default_storage_options(url), **(storage_options or {})}
    protocol = protocol_of(url)
    if protocol in ("s3", "s3a"):
        # One retry policy, ours (bounded, logged): botocore's own retries would hide short outages
        # unlogged and stretch every attempt of a long one.
        options.setdefault("config_kwargs", {"retries": {"total_max_attempts": 1}})
    # credentials that botocore reads from the environment are part of the key too, so that a
    # changed AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY is not answered with a stale filesystem
    env_creds = hash(tuple(os.environ.get(k) for k in _CREDENTIAL_ENV)) if protocol in ("s3", "s3a") else None
    cache_key = (os.getpid(), protocol, repr(sorted(options.items())), env_creds)
    fs = _FILESYSTEMS.get(cache_key)
    if fs is None:
        fs = fsspec.filesystem(protocol, skip_instance_cache=True, **options)
        if protocol not in ("file", "local"):
            fs = RetryingFileSystem(fs, protocol)
        _FILESYSTEMS[cache_key] = fs
    path = local_path(url) if protocol == "file" else url.split("://", 1)[1]
    return fs, path


def open_url(url: str, mode: str = "rb", storage_options: dict | None = None, **kwargs):
    fs, path = filesystem(url, storage_options)
    if "w" in mode and is_local(url):
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    return fs.open(path, mode, **kwargs)


def exists(url: str, storage_options: dict | None = None) -> bool:
    fs, path = filesystem(url, storage_options)
    return fs.exists(path)


def makedirs(url: str, storage_options: dict | None = None) -> None:
    fs, path = filesystem(url, storage_options)
    if is_local(url):
        os.makedirs(path, exist_ok=True)
    else:  # object stores have no directories; creating the bucket is the user's business
        pass


def join(base: str, name: str) -> str:
    if is_local(base):
        return os.path.join(base, name)
    return base.rstrip("/") + "/" + name


def rename(src: str, dst: str, storage_options: dict | None = None) -> None:
    fs, src_path = filesystem(src, storage_options)
    _, dst_path = filesystem(dst, storage_options)
    if is_local(src):
        os.replace(src_path, dst_path)
    else:
        fs.mv(src_path, dst_path)


def expand_urls(pattern: str | list[str], storage_options: dict | None = None) -> list[str]:
    """Brace-expand ``a-{000..009}.tar`` (and globs), keeping the URL scheme. Order is preserved."""
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    urls: list[str] = []
    for item in patterns:
        for url in braceexpand(item):
            if any(ch in url for ch in "*?["):
                if is_local(url):
                    matches = sorted(glob.glob(local_path(url)))
                else:
                    fs, path = filesystem(url, storage_options)
                    prefix = url.split("://", 1)[0] + "://"
                    matches = [prefix + m for m in sorted(fs.glob(path))]
                if not matches:
                    raise FileNotFoundError(f"no files match {url!r}")
                urls.extend(matches)
            else:
                urls.append(url)
    if not urls:
        raise FileNotFoundError(f"pattern {pattern!r} names no shards")
    return urls


def basename(url: str) -> str:
    return posixpath.basename(url.rstrip("/"))


def redact(options: Any) -> Any:
    """A copy of a nested options structure with every secret-looking value replaced by '***'."""
    if isinstance(options, dict):
        return {
            k: ("***" if any(w in str(k).lower() for w in _SECRET_WORDS) and v not in (None, "") else redact(v))
            for k, v in options.items()
        }
    if isinstance(options, (list, tuple)):
        return type(options)(redact(v) for v in options)
    return options


def explain_storage_error(url: str, error: BaseException) -> str:
    """A one-line message for a storage failure that helps the user fix it (no secrets in it)."""
    text = f"{type(error).__name__}: {error}"
    if protocol_of(url) in ("s3", "s3a"):
        lowered = text.lower()
        if any(w in lowered for w in ("accessdenied", "access denied", "invalidaccesskeyid", "signaturedoesnotmatch", "forbidden", "permissionerror", "403")):
            endpoint = default_storage_options(url).get("endpoint_url", "AWS default")
            return (
                f"access to {url} was denied by the S3 server at {endpoint}: check AWS_ACCESS_KEY_ID / "
                f"AWS_SECRET_ACCESS_KEY (or the storage options) ({text})"
            )
    return f"cannot read {url} ({text})"


def register_webdataset_s3() -> None:
    """Let plain ``webdataset.WebDataset('s3://...')`` open shards through fsspec/s3fs."""
    import importlib

    # not `import webdataset.gopen as gopen`: webdataset re-exports the *function* gopen under
    # that name, so the import statement binds the function, not the module
    gopen = importlib.import_module("webdataset.gopen")

    def gopen_fsspec(url, mode="rb", bufsize=8192, **kw):
        return open_url(url, mode)

    for scheme in ("s3", "gs", "az", "abfs", "memory"):
        gopen.gopen_schemes.setdefault(scheme, gopen_fsspec)
