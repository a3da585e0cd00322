"""Shards: plain tar files of samples (see schema.py), each with a sidecar sample index.

One job per module:

* :mod:`.tar` — the one tar parser (members, sample groups, damage with byte offsets);
* :mod:`.index` — the sidecar index (``X.tar.idx.json``): write, read, check, or build by a scan;
  with each sample's member table (where its members lie: ranged reads slice them without
  walking tar headers);
* :mod:`.writer` — :class:`ShardWriter`, samples into shards and their indices;
* :mod:`.ranges` — consecutive samples from any byte offset with one exact ranged read.

The names below are re-exported so that ``from data_pipeline.shards import ...`` keeps working.
"""

from data_pipeline.shards.index import (INDEX_FORMAT, INDEX_SUFFIX, IndexFileError, MemberTable, ShardIndex,
                                        load_or_build_index, read_index, scan_index, write_index)
from data_pipeline.shards.ranges import RawRange, read_raw_range, read_sample_range
from data_pipeline.shards.tar import TarDamage, iter_tar_groups, span_bytes
from data_pipeline.shards.writer import ShardWriter

__all__ = [
    "INDEX_FORMAT", "INDEX_SUFFIX", "IndexFileError", "MemberTable", "RawRange", "ShardIndex", "ShardWriter", "TarDamage",
    "iter_tar_groups", "load_or_build_index", "read_index", "read_raw_range", "read_sample_range", "scan_index",
    "span_bytes", "write_index",
]
