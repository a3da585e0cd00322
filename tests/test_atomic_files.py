"""data_pipeline.atomic_files: the one atomic write every module uses (checkpoint manifests and
``latest``, metrics rewrites, images, meshes)."""

from __future__ import annotations

import pytest

from data_pipeline.atomic_files import atomic_write, write_atomic


def test_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "latest"  # the parent is created
    write_atomic(path, "step_00000001\n")
    write_atomic(path, "step_00000002\n")
    assert path.read_text() == "step_00000002\n"
    write_atomic(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in path.parent.iterdir()) == ["latest"]


def test_an_error_while_writing_keeps_the_old_file(tmp_path):
    path = tmp_path / "MANIFEST.json"
    write_atomic(path, "old")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_write(path) as f:
            f.write("half of the new")
            raise RuntimeError("disk on fire")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["MANIFEST.json"]


def test_fsync_and_bad_mode(tmp_path):
    with atomic_write(tmp_path / "m.jsonl", fsync=True) as f:
        f.writelines(["a\n", "b\n"])
    assert (tmp_path / "m.jsonl").read_text() == "a\nb\n"
    with pytest.raises(ValueError, match="mode"):
        with atomic_write(tmp_path / "x", "a"):
            pass
