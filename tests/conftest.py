"""Shared fixtures. A real S3 server (SeaweedFS on loopback) is started once per session."""

from __future__ import annotations

import uuid

import pytest
import torch

from launch.cluster.local_s3 import LocalS3Server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One running :class:`LocalS3Server` for the whole session. Fails (never skips) if it cannot start."""
    try:
        server = LocalS3Server(tmp_path_factory.mktemp("s3"))
    except Exception as exc:
        pytest.fail(f"the local S3 server (SeaweedFS) did not start: {exc}", pytrace=False)
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket for this test: ``"s3://test-<random>"``."""
    return s3_server.create_bucket(f"test-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point the environment (AWS_* variables) at the session's S3 server for this test."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return s3_server


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors on 2 shared cores: a second intra-op thread only adds sync overhead, which turns
    into multi-second stalls when other jobs share the machine. Use with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
