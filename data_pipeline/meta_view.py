"""What the streaming reader takes from a sample's ``meta.json`` (schema v1), and only that.

A 24-view object's metadata is ~11 KB of JSON, nearly all of it the 24 cameras, of which a batch
uses 4. It is parsed with simdjson (pysimdjson), which validates the whole document (structure,
UTF-8, numbers) but builds no Python objects until a field is read: then only the chosen views'
fields are converted (their cameras straight into float64 buffers). Measured on the benchmark's
metadata (24 views, 11 KB): 36-42 us per object against 48-67 us for ``orjson.loads`` and picking
the same fields from its dicts (the parse alone: 12-18 against 35 us).

The checks are those of :func:`data_pipeline.schema.parse_sample` for the fields the reader uses;
anything malformed is a :class:`MetaError` with the reason the reader counts it under.

simdjson's proxies point into its parser's buffer, so a parser refuses a new document while any
proxy of the last one is alive; here none leaves :meth:`MetaReader.read` (values are converted,
errors become strings before they are raised).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import simdjson

from data_pipeline.schema import META_SUFFIX, SCHEMA_VERSION


class MetaError(ValueError):
    """Unusable metadata; ``reason`` is what the reader counts the skip under."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class ChosenViews:
    """The fields of one object that a batch needs: its metadata and the chosen views' cameras."""

    object_id: str
    width: int
    height: int
    background: tuple[float, float, float]
    chosen: np.ndarray  # (n,) int64: the stored views picked, in the order drawn
    K: np.ndarray  # (n, 3, 3) float64
    c2w: np.ndarray  # (n, 4, 4) float64
    names: list[str]  # member suffix of each chosen view
    mask_names: list  # member suffix of each chosen view's mask, or None (schema v1: only with masks)
    extra: dict  # only read when asked for (ReaderConfig.box_half_size), else {}


class MetaReader:
    """One per reading thread (a simdjson parser is reused from document to document)."""

    def __init__(self):
        self._parser = simdjson.Parser()

    def read(self, data: bytes, key: str, rng: np.random.Generator, count: int, needed: int,
             extra: bool = False) -> ChosenViews:
        """Parse ``data`` and draw ``count`` of its views with ``rng`` (``rng.permutation``, as
        before this module); an object with fewer than ``needed`` views is refused."""
        try:
            doc = self._parse(data)
        except ValueError as error:  # simdjson: not JSON, bad UTF-8, a number out of range ...
            raise MetaError("bad sample", f"sample {key!r}: {META_SUFFIX} is not valid JSON ({error})") from None
        try:
            failure, out = _extract(doc, key, rng, count, needed, extra)
        finally:
            del doc  # before anything else is parsed
        if failure is not None:
            raise MetaError(*failure)
        return out

    def _parse(self, data: bytes):
        try:
            return self._parser.parse(data)
        except RuntimeError:  # a proxy of the last document is still referenced somewhere: a fresh parser
            self._parser = simdjson.Parser()
            return self._parser.parse(data)


def _extract(doc, key: str, rng: np.random.Generator, count: int, needed: int, extra: bool):
    """(failure as (reason, message) or None, ChosenViews or None); raises nothing, keeps no proxy."""
    if not isinstance(doc, simdjson.Object) or doc.get("schema_version") != SCHEMA_VERSION:
        version = doc.get("schema_version") if isinstance(doc, simdjson.Object) else None
        if isinstance(version, (simdjson.Object, simdjson.Array)):
            version = "(not a number)"
        return ("bad sample", f"sample {key!r}: schema_version {version!r} is not supported (this reader knows "
                              f"{SCHEMA_VERSION})"), None
    views = doc.get("views")
    if not isinstance(views, simdjson.Array):
        return ("bad sample", f"sample {key!r}: malformed {META_SUFFIX} field (views)"), None
    if len(views) < needed:
        return ("too few views", f"object {key} has {len(views)} views; the reader needs context_views_max + "
                                 f"target_views = {needed}"), None
    chosen = rng.permutation(len(views))[:count]
    try:
        width, height = int(doc["width"]), int(doc["height"])
        picked = [views[v] for v in chosen.tolist()]
        K, c2w = _cameras(picked)
        names = [str(v["name"]) for v in picked]
        # schema v1: "mask" only when the sample has masks (looked up among the keys: a missing
        # key costs simdjson an exception, 2 us a view)
        mask_names = [_plain(v["mask"]) if "mask" in v.keys() else None for v in picked]
        background = doc.get("background")
        background = (1.0, 1.0, 1.0) if background is None else tuple(float(c) for c in background)
        object_id = doc.get("object_id")
        object_id = key if object_id is None else str(_plain(object_id))
        more = {}
        if extra:
            found = doc.get("extra")
            more = found.as_dict() if isinstance(found, simdjson.Object) else {}
    except Exception as error:  # noqa: BLE001 -- any field of the wrong type or shape (TypeError, KeyError, ...)
        return ("bad sample", f"sample {key!r}: malformed {META_SUFFIX} field ({type(error).__name__}: {error})"), None
    return None, ChosenViews(object_id, width, height, background, chosen, K, c2w, names, mask_names, more)


def _cameras(views: list) -> tuple[np.ndarray, np.ndarray]:
    """(n, 3, 3) K and (n, 4, 4) c2w float64 from the views' JSON arrays (rows of numbers, or the
    numbers in row order), each array's numbers copied straight into one buffer by simdjson."""
    buffers = [v["K"].as_buffer(of_type="d") for v in views] + [v["c2w"].as_buffer(of_type="d") for v in views]
    n = len(views)
    if any(len(memoryview(b)) != (72 if i < n else 128) for i, b in enumerate(buffers)):  # bytes: 9 or 16 numbers
        raise ValueError("K must be 3x3 and c2w 4x4 numbers")
    flat = np.frombuffer(b"".join(buffers), dtype=np.float64)
    return flat[:9 * n].reshape(n, 3, 3), flat[9 * n:].reshape(n, 4, 4)


def _plain(value):
    """A JSON value as a plain Python one (proxies of arrays and objects converted)."""
    if isinstance(value, simdjson.Array):
        return value.as_list()
    if isinstance(value, simdjson.Object):
        return value.as_dict()
    return value
