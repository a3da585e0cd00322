"""Checks that take a second and save an hour: run before a run directory is made or an engine starts.

    check_data(train_urls, holdout_urls, storage_options, views_needed=4)   # raises PreflightError

What is checked, each failure named by the config field or environment variable to fix:

* every bucket named by a URL exists and the credentials open it (the same check, and the same
  message, for brace patterns and globs: a glob otherwise fails as "no files match" and a brace
  pattern only when its first shard is read);
* the URL patterns match at least one shard;
* the first object of the training data has enough views for ``context_views_max + target_views``.
"""

from __future__ import annotations

from braceexpand import braceexpand

from data_pipeline import storage
from data_pipeline.schema import SampleError, parse_sample
from data_pipeline.shards import load_or_build_index, read_sample_range

_CREDENTIALS = "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or data.storage_options key / secret)"


class PreflightError(ValueError):
    """A setting that would fail the run later; the message names the field or variable to fix."""


def check_bucket(url: str, field: str, storage_options: dict | None = None) -> None:
    """The bucket of an ``s3://`` URL exists and the credentials may use it (no-op for other URLs)."""
    if storage.protocol_of(url) not in ("s3", "s3a"):
        return
    bucket = url.split("://", 1)[1].split("/", 1)[0]
    fs, _ = storage.filesystem(url, storage_options)
    endpoint = {**storage.default_storage_options(url), **(storage_options or {})}.get("endpoint_url", "AWS default")
    try:
        fs.call_s3("head_bucket", Bucket=bucket)
    except storage.StorageUnavailableError as error:
        raise PreflightError(f"{field}: {error}") from None
    except Exception as error:  # s3fs turns 404 into FileNotFoundError, 403 into PermissionError
        text = f"{type(error).__name__}: {error}"
        lowered = text.lower()
        if type(error).__name__ == "NoCredentialsError" or "unable to locate credentials" in lowered:
            raise PreflightError(f"{field}: no S3 credentials for {url}: set {_CREDENTIALS}") from None
        if isinstance(error, FileNotFoundError) or "404" in lowered or "nosuchbucket" in lowered:
            raise PreflightError(f"{field}: bucket {bucket!r} does not exist on the S3 server at {endpoint} "
                                 f"(URL {url})") from None
        if isinstance(error, PermissionError) or any(w in lowered for w in ("403", "accessdenied", "forbidden",
                                                                             "signature", "invalidaccesskeyid")):
            raise PreflightError(f"{field}: access to bucket {bucket!r} was denied by the S3 server at {endpoint}: "
                                 f"check {_CREDENTIALS}") from None
        raise PreflightError(f"{field}: cannot reach bucket {bucket!r} at {endpoint} ({text})") from None


def check_urls(pattern: str, field: str, storage_options: dict | None = None) -> list[str]:
    """The shard URLs of ``pattern`` after checking their buckets; refuses a pattern matching nothing."""
    seen: set[str] = set()
    for url in braceexpand(pattern):
        if storage.protocol_of(url) in ("s3", "s3a"):
            bucket = url.split("://", 1)[1].split("/", 1)[0]
            if bucket not in seen:
                seen.add(bucket)
                check_bucket(url, field, storage_options)
    try:
        urls = storage.expand_urls(pattern, storage_options)
    except FileNotFoundError as error:
        raise PreflightError(f"{field}: {error} (pattern {pattern!r})") from None
    except storage.StorageUnavailableError as error:
        raise PreflightError(f"{field}: {error}") from None
    first = urls[0]
    try:
        if not storage.exists(first, storage_options):
            raise PreflightError(f"{field}: shard {first} does not exist (pattern {pattern!r})")
    except PermissionError as error:
        raise PreflightError(f"{field}: {storage.explain_storage_error(first, error)}") from None
    return urls


def views_per_object(url: str, storage_options: dict | None = None) -> int:
    """Views of the first object of a shard (reads its index and one sample)."""
    index = load_or_build_index(url, storage_options)
    if len(index) == 0:
        raise PreflightError(f"shard {url} holds no objects")
    for key, _, members in read_sample_range(url, index, 0, 1, storage_options):
        return parse_sample(key, members, check_cameras=False).num_views
    raise PreflightError(f"shard {url}: its first object could not be read")


def check_data(train_urls: str, holdout_urls: str | None, storage_options: dict | None, views_needed: int,
               prefix: str = "data") -> None:
    """Everything above for a run's data section; raises :class:`PreflightError`."""
    options = storage_options or None
    urls = check_urls(train_urls, f"{prefix}.train_urls", options)
    if holdout_urls:
        check_urls(holdout_urls, f"{prefix}.holdout_urls", options)
    try:
        views = views_per_object(urls[0], options)
    except (SampleError, OSError, ValueError) as error:
        if isinstance(error, PreflightError):
            raise
        raise PreflightError(f"{prefix}.train_urls: cannot read the first object of {urls[0]} "
                             f"({type(error).__name__}: {error})") from None
    if views < views_needed:
        raise PreflightError(
            f"{prefix}.context_views_max + {prefix}.target_views = {views_needed} views per object are needed, but the "
            f"objects of {urls[0]} have {views}: lower {prefix}.context_views_max")


def check_run(config) -> None:
    """:func:`check_data` and the checkpoint bucket of a run config (``trainer.config.RunConfig``)."""
    d = config.data
    check_data(d.train_urls, d.holdout_urls, d.storage_options, d.context_views_max + d.target_views)
    if config.checkpoint.dir:
        check_bucket(config.checkpoint.dir, "checkpoint.dir", d.storage_options or None)
