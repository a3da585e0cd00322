"""argparse value types shared by the command-line tools: each error names what was expected.

The errors are :class:`BadValue`, both an ``argparse.ArgumentTypeError`` (argparse prints its
message) and a ``ValueError`` (library code that parses the same text catches that)."""

from __future__ import annotations

import argparse
import contextlib
import math
import re


class BadValue(argparse.ArgumentTypeError, ValueError):
    """A value that does not parse; the message says what was expected."""


_NAMED_BACKGROUNDS = {"white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0), "gray": (0.5, 0.5, 0.5), "grey": (0.5, 0.5, 0.5)}


def background_colour(text: str) -> tuple[float, float, float]:
    """An RGB colour in [0, 1]: r,g,b or a name (white, black, gray)."""
    if text.strip().lower() in _NAMED_BACKGROUNDS:
        return _NAMED_BACKGROUNDS[text.strip().lower()]
    parts = text.split(",")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise BadValue(f"expected r,g,b numbers in [0, 1] or a name ({', '.join(_NAMED_BACKGROUNDS)}), got {text!r}") from None
    if len(values) != 3 or not all(0.0 <= v <= 1.0 for v in values):
        raise BadValue(f"expected three numbers in [0, 1] (e.g. 1,1,1 for white), got {text!r}")
    return values  # type: ignore[return-value]


def byte_size(text: str) -> int:
    """Bytes, with an optional K/M/G/T suffix (powers of 1024): 1073741824, 1G, 512MiB."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise BadValue(f"expected a size such as 1073741824, 512M or 1G, got {text!r}")
    number, unit = float(match.group(1)), match.group(2).upper()
    value = int(number * 1024 ** " KMGT".index(unit or " "))
    if value < 1:
        raise BadValue(f"size must be positive, got {text!r}")
    return value


def int_at_least(minimum: int):
    """An argparse type: an integer >= ``minimum``."""
    def parse(text: str) -> int:
        return _int_at_least(text, minimum, f"an integer >= {minimum}")

    parse.__name__ = f"int_at_least_{minimum}"
    return parse


def _int_at_least(text: str, minimum: int, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise BadValue(f"expected {expected}, got {text!r}") from None
    if value < minimum:
        raise BadValue(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer")


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise BadValue(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise BadValue(f"expected a positive number, got {text!r}")
    return value


def nonnegative_int(text: str) -> int:
    return _int_at_least(text, 0, "a non-negative integer")


@contextlib.contextmanager
def usage_errors(parser: argparse.ArgumentParser, *kinds: type[BaseException]):
    """``with usage_errors(parser, ConfigError): ...``: an error of one of ``kinds`` raised in the
    block (a bad combination of arguments the library found) exits like a bad argument: its
    message, the usage line and status 2."""
    try:
        yield
    except kinds as error:
        parser.error(str(error))
