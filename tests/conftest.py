"""Shared fixtures: a real S3 server (SeaweedFS on loopback) started once per test session."""
from __future__ import annotations

import os

import pytest

from voxstream.shards.locals3 import local_s3


@pytest.fixture(scope="session")
def s3_server():
    """A running S3 server; its AWS_* variables are exported for the whole session (subprocesses too)."""
    with local_s3(bucket="test") as server:
        saved = {k: os.environ.get(k) for k in server.env}
        os.environ.update(server.env)
        try:
            yield server
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@pytest.fixture
def s3_url(s3_server, request):
    """A fresh prefix in the test bucket for one test."""
    name = request.node.name.replace("[", "_").replace("]", "_")
    return f"s3://{s3_server.bucket}/{name}"
