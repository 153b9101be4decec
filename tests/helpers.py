"""Run jobs from tests through the same path the CLI takes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import zarr

from segpipe.config import job_from_dict
from segpipe.pipeline import Outcome, check, run_job


def run(client, output: Path, **job: Any) -> Outcome:
    spec = job_from_dict({"output": str(output), **job}, Path.cwd())
    return run_job(check(spec), client)


def class_map(outcome: Outcome) -> np.ndarray:
    return np.asarray(zarr.open_array(outcome.result, path="class", mode="r")[:])
