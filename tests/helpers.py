"""Run jobs from tests through the same path the CLI takes."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import yaml
import zarr

from segpipe.config import job_from_dict
from segpipe.pipeline import Outcome, check, run_job


def run(client, output: Path, **job: Any) -> Outcome:
    spec = job_from_dict({"output": str(output), **job}, Path.cwd())
    return run_job(check(spec), client)


def check_error(tmp_path: Path, job: dict) -> str:
    """The one line that checking ``job`` refuses it with, in this process: what ``segpipe run`` prints after
    ``segpipe: error:`` (the check runs before anything is written; the CLI's wrapper, exit 2 and no
    traceback, is tested through the CLI itself). Fails the test if the job passes the check."""
    import pytest

    from segpipe.api import check_job
    from segpipe.errors import InputError

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    with pytest.raises(InputError) as err:
        check_job(path)
    message = str(err.value)
    assert "\n" not in message, message
    return message


def class_map(outcome: Outcome) -> np.ndarray:
    return np.asarray(zarr.open_array(outcome.result, path="class", mode="r")[:])


def cli(tmp_path: Path, job: dict, *args: str) -> subprocess.CompletedProcess:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return subprocess.run([sys.executable, "-m", "segpipe.cli", "run", *args, str(path)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("segpipe: error: ")
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


@contextlib.contextmanager
def moto_s3(bucket: str) -> Iterator[Any]:
    """A moto S3 server on 127.0.0.1 with ``bucket``; endpoint and credentials through the standard AWS variables
    (restored after), so processes started meanwhile reach it too. Yields a boto3 client."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "segpipe",
           "AWS_SECRET_ACCESS_KEY": "segpipe-secret", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        with mock.patch.dict(os.environ, env):
            boto3.client("s3").create_bucket(Bucket=bucket)
            yield boto3.client("s3")
    finally:
        server.stop()
