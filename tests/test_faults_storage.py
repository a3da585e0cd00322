"""Object-storage outages against the real local S3 server (SeaweedFS): stopped, started again, throttling.

Each test that stops a server uses its own (the session's ``s3_server`` keeps serving the others).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

import botocore.exceptions
import pytest
from s3fs.errors import translate_boto_error

from data_pipeline import storage
from data_pipeline.synthetic import generate_dataset
from launch.cluster.local_s3 import LocalS3Error, LocalS3Server, port_states
from tests.test_trainer import launch, losses, settings


@pytest.fixture
def own_server(tmp_path):
    server = LocalS3Server(tmp_path / "s3")
    server.create_bucket("outage")
    yield server
    server.stop()


def restart_later(server: LocalS3Server, seconds: float) -> threading.Thread:
    def run():
        time.sleep(seconds)
        server.start()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def client_error(code: str, status: int) -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


@pytest.mark.parametrize("code,status,transient", [
    ("SlowDown", 503, True), ("ServiceUnavailable", 503, True), ("InternalError", 500, True),
    ("BadGateway", 502, True), ("TooManyRequests", 429, True), ("RequestTimeout", 400, True),
    ("AccessDenied", 403, False), ("NoSuchKey", 404, False), ("NoSuchBucket", 404, False),
    ("InvalidAccessKeyId", 403, False), ("SignatureDoesNotMatch", 403, False),
])
def test_throttling_and_5xx_are_retried_answers_are_not(code, status, transient):
    error = client_error(code, status)
    assert storage.is_transient(error) is transient
    # ...also after s3fs translated it (an OSError whose cause is the ClientError)
    assert storage.is_transient(translate_boto_error(error)) is transient
    assert storage.is_transient(botocore.exceptions.EndpointConnectionError(endpoint_url="http://x"))
    assert storage.is_transient(ConnectionResetError()) and storage.is_transient(TimeoutError())
    assert not storage.is_transient(FileNotFoundError("s3://b/k")) and not storage.is_transient(ValueError())


def test_reads_wait_for_a_restarted_server_and_the_outage_is_logged_once(own_server, caplog):
    options = own_server.storage_options()
    payload = os.urandom(3 << 20)
    with storage.open_url("s3://outage/blob", "wb", options) as f:
        f.write(payload)
    fs, path = storage.filesystem("s3://outage/blob", options)
    reader = fs.open(path, "rb")
    assert reader.read(1000) == payload[:1000]
    port = own_server.port
    own_server.stop()
    restart = restart_later(own_server, 4.0)
    caplog.set_level(logging.WARNING, "data_pipeline.storage")
    start = time.monotonic()
    assert storage.exists("s3://outage/blob", options)  # during the outage: waits instead of failing
    reader.seek(2 << 20)
    assert reader.read(4096) == payload[2 << 20:(2 << 20) + 4096]  # a file opened before the outage goes on
    waited = time.monotonic() - start
    restart.join()
    assert own_server.port == port  # the restarted server keeps its endpoint
    assert waited >= 3.0, waited
    down = [r for r in caplog.records if "unreachable" in r.getMessage()]
    up = [r for r in caplog.records if "reachable again" in r.getMessage()]
    assert len(down) == 1 and len(up) == 1, [r.getMessage() for r in caplog.records]
    assert own_server.secret_key not in caplog.text


def test_an_outage_longer_than_the_bound_ends_with_a_clear_error(own_server, monkeypatch):
    options = own_server.storage_options()
    with storage.open_url("s3://outage/blob", "wb", options) as f:
        f.write(b"x")
    own_server.stop()
    monkeypatch.setenv(storage.RETRY_ENV, "1.5")
    start = time.monotonic()
    with pytest.raises(storage.StorageUnavailableError) as caught:
        with storage.open_url("s3://outage/blob", "rb", options) as f:
            f.read()
    assert time.monotonic() - start < 30
    assert not isinstance(caught.value, OSError)  # the reader skips damaged shards on OSError, never an outage
    message = str(caught.value)
    assert "unreachable" in message and "1.5s" in message and "data.storage_retry_seconds" in message
    assert "s3://outage/blob" in message and own_server.secret_key not in message


def test_an_upload_is_retried_and_never_half_written(own_server):
    options = own_server.storage_options()
    own_server.stop()
    restart = restart_later(own_server, 3.0)
    payload = os.urandom(6 << 20)  # multipart-sized
    with storage.open_url("s3://outage/ckpt/shard.pt", "wb", options) as f:
        f.write(payload)
    restart.join()
    with storage.open_url("s3://outage/ckpt/shard.pt", "rb", options) as f:
        assert f.read() == payload
    with pytest.raises(RuntimeError):  # an error while writing publishes nothing
        with storage.open_url("s3://outage/ckpt/partial.pt", "wb", options) as f:
            f.write(b"half")
            raise RuntimeError("crash while writing")
    storage.filesystem("s3://outage/ckpt", options)[0].invalidate_cache()
    assert not storage.exists("s3://outage/ckpt/partial.pt", options)


def test_local_s3_restarts_on_an_existing_directory(tmp_path):
    directory = tmp_path / "s3data"
    with LocalS3Server(directory) as first:
        first.create_bucket("kept")
        with storage.open_url("s3://kept/object", "wb", first.storage_options()) as f:
            f.write(b"still here")
        keys = first.access_key, first.secret_key
    with LocalS3Server(directory) as second:  # a new process on the same directory (the CLI's case)
        assert (second.access_key, second.secret_key) == keys
        assert second.create_bucket("kept") == "s3://kept"  # was: BucketAlreadyExists
        with storage.open_url("s3://kept/object", "rb", second.storage_options()) as f:
            assert f.read() == b"still here"


def _time_wait_port(reuse_address: bool) -> int:
    """A port whose only socket is a closed connection in TIME_WAIT (the server side closed first)."""
    listener = socket.socket()
    if reuse_address:  # as weed (Go) and most servers set it; the TIME_WAIT socket inherits it
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = listener.accept()
    conn.close()  # the side that closes first keeps TIME_WAIT, on `port`
    time.sleep(0.1)
    client.close()
    listener.close()
    time.sleep(0.1)
    return port


def test_a_port_in_time_wait_is_reported_as_such(tmp_path):
    # Linux lets a new listener bind over TIME_WAIT only if both sockets set SO_REUSEADDR.
    blocked = _time_wait_port(reuse_address=False)
    assert port_states(blocked) == {"TIME_WAIT"}
    with pytest.raises(LocalS3Error, match=f"port {blocked} on 127.0.0.1 is still in TIME_WAIT"):
        LocalS3Server(tmp_path / "tw", port=blocked)  # was: "already in use"
    usable = _time_wait_port(reuse_address=True)  # what a stopped weed leaves behind
    assert port_states(usable) == {"TIME_WAIT"}
    with LocalS3Server(tmp_path / "tw", port=usable) as server:
        assert server.port == usable
        with socket.socket() as probe:  # ...and a live listener is reported as one
            probe.bind(("127.0.0.1", 0))
            probe.listen()
            busy = probe.getsockname()[1]
            with pytest.raises(LocalS3Error, match="another process is listening"):
                LocalS3Server(tmp_path / "busy", port=busy)


def _s3_dataset(server: LocalS3Server, tmp_path) -> tuple[str, str]:
    remote = generate_dataset("s3://outage/data", objects=48, views=8, resolution=32, seed=2, holdout_fraction=0.125,
                              progress=False, storage_options=server.storage_options())
    return remote["train_pattern"], remote["holdout_pattern"]


def test_training_survives_the_s3_server_stopped_for_25s(own_server, tmp_path, monkeypatch):
    """A real 2-rank run reading shards from and checkpointing to S3; the server is stopped mid-run."""
    for key, value in own_server.env().items():
        monkeypatch.setenv(key, value)
    outage = float(os.environ.get("GOEMBED_TEST_OUTAGE_S", "25"))
    run_dir = str(tmp_path / "run")
    checkpoints = "s3://outage/checkpoints"
    args = settings(_s3_dataset(own_server, tmp_path), run_dir, **{
        "checkpoint.dir": checkpoints, "data.shuffle_block_objects": 2, "data.storage_retry_seconds": 120})
    process = launch(args)
    metrics = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if os.path.exists(metrics) and max(losses(run_dir), default=0) >= 2:
            break
        time.sleep(0.1)
    assert process.poll() is None, process.communicate()[1][-3000:]
    own_server.stop()
    stopped_at_step = max(losses(run_dir))
    time.sleep(outage)
    during = max(losses(run_dir))
    own_server.start()
    out, err = process.communicate(timeout=400)
    assert process.returncode == 0, err[-4000:]
    assert during < 12, "the run did not need the server during the outage: the test proves nothing"
    assert sorted(losses(run_dir)) == list(range(1, 13)), (stopped_at_step, during)
    assert "object storage unreachable" in err and "reachable again" in err, err[-3000:]
    assert "skipped a sample" not in err and "damaged" not in err  # waited, did not skip
    from trainer.checkpoint import Checkpointer
    from trainer.distributed import DistEnv

    checkpointer = Checkpointer(checkpoints, DistEnv(0, 1, 0, None))
    storage.filesystem(checkpoints)[0].invalidate_cache()
    assert checkpointer.latest_tag() == "step_00000012"
    assert checkpointer.verify("step_00000012")["world_size"] == 2


def test_training_ends_clearly_when_the_outage_outlasts_the_bound(own_server, tmp_path, monkeypatch):
    for key, value in own_server.env().items():
        monkeypatch.setenv(key, value)
    run_dir = str(tmp_path / "run")
    args = settings(_s3_dataset(own_server, tmp_path), run_dir, **{
        "data.shuffle_block_objects": 2, "data.storage_retry_seconds": 3, "train.max_steps": 40,
        "checkpoint.every_steps": 100})
    process = launch(args, nproc=1)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if os.path.exists(os.path.join(run_dir, "metrics.jsonl")) and max(losses(run_dir), default=0) >= 1:
            break
        time.sleep(0.1)
    own_server.stop()
    stopped = time.monotonic()
    out, err = process.communicate(timeout=120)
    assert process.returncode != 0
    assert time.monotonic() - stopped < 60
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert lines and "object storage unreachable" in lines[-1] and "data.storage_retry_seconds" in lines[-1], err[-3000:]
    assert "Traceback" not in err, err[-3000:]
