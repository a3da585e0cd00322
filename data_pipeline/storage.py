"""URLs for everything that touches storage: local paths, file://, s3://, or any fsspec URL.

S3 settings come from the environment unless given explicitly:

* ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (read by botocore itself),
* ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` for a non-AWS server (MinIO, SeaweedFS, ...),
* ``AWS_REGION`` / ``AWS_DEFAULT_REGION``.

Credentials are never logged: use :func:`redact` before printing or saving options.
"""

from __future__ import annotations

import glob
import os
import posixpath
from typing import Any

import fsspec
from braceexpand import braceexpand

_SECRET_WORDS = ("secret", "password", "token", "key", "credential")

# One filesystem per (process, protocol, options): s3fs objects must not cross a fork (their
# aiohttp loop belongs to the parent), so the cache is keyed by pid.
_FILESYSTEMS: dict[tuple, Any] = {}
_CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


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


def filesystem(url: str, storage_options: dict | None = None):
    """(fsspec filesystem, path inside it) for a URL, cached per process."""
    options = {**default_storage_options(url), **(storage_options or {})}
    protocol = protocol_of(url)
    # credentials that botocore reads from the environment are part of the key too, so that a
    # changed AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY is not answered with a stale filesystem
    env_creds = hash(tuple(os.environ.get(k) for k in _CREDENTIAL_ENV)) if protocol in ("s3", "s3a") else None
    cache_key = (os.getpid(), protocol, repr(sorted(options.items())), env_creds)
    fs = _FILESYSTEMS.get(cache_key)
    if fs is None:
        fs = fsspec.filesystem(protocol, skip_instance_cache=True, **options)
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
