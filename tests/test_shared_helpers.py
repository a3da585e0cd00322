"""The small helpers every tool shares: argument types (data_pipeline.cli_types), the spawn pool
(data_pipeline.parallel) and the rank lookup (data_pipeline.ranks)."""

from __future__ import annotations

import argparse
import os

import pytest

from data_pipeline.cli_types import BadValue, background_colour, byte_size, int_at_least, positive_int, usage_errors
from data_pipeline.parallel import map_in_order
from data_pipeline.ranks import rank_and_world


def test_argument_types_name_what_was_expected():
    assert background_colour("white") == (1.0, 1.0, 1.0) and background_colour("0,0.5,1") == (0.0, 0.5, 1.0)
    assert byte_size("512M") == 512 << 20 and positive_int("3") == 3 and int_at_least(2)("2") == 2
    for parse, text, expected in ((background_colour, "pink", "r,g,b"), (background_colour, "1,2,3", "three numbers"),
                                  (int_at_least(2), "1", "an integer >= 2"), (positive_int, "x", "a positive integer")):
        with pytest.raises(BadValue, match=expected):
            parse(text)
    # one error type for argparse (its message is shown) and for library callers (a ValueError)
    assert issubclass(BadValue, argparse.ArgumentTypeError) and issubclass(BadValue, ValueError)


def test_usage_errors_exit_like_a_bad_argument(capsys):
    parser = argparse.ArgumentParser(prog="tool")
    with pytest.raises(SystemExit) as exit_info:
        with usage_errors(parser, FileNotFoundError):
            raise FileNotFoundError("no shard matches 'x-*.tar'")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: tool") and "tool: error: no shard matches 'x-*.tar'" in err
    with pytest.raises(KeyError):  # other errors pass through
        with usage_errors(parser, FileNotFoundError):
            raise KeyError("bug")


def _pid_and_square(x: int) -> tuple[int, int]:
    return os.getpid(), x * x


def test_map_in_order_keeps_the_order_in_this_process_or_in_spawned_ones():
    here = list(map_in_order(_pid_and_square, range(5), workers=1))
    assert [r for _, r in here] == [0, 1, 4, 9, 16] and {pid for pid, _ in here} == {os.getpid()}
    pooled = list(map_in_order(_pid_and_square, range(5), workers=2))
    assert [r for _, r in pooled] == [0, 1, 4, 9, 16] and os.getpid() not in {pid for pid, _ in pooled}


def test_rank_and_world_without_a_process_group():
    assert rank_and_world() == (0, 1)
