"""Scheduled land-cover run: a Prefect deployment of the archive flow on a cron schedule.

    python -m segpipe_flows.deploy --serve          # register and serve it (this process runs the flow runs)
    python -m segpipe_flows.deploy                  # only register it with the Prefect API
    prefect deploy --name landcover-nightly # the same deployment from prefect.yaml, for a work pool

Parameters (input glob, job template, output location, Dask scheduler) default from the
environment, so one image serves any site: SEGPIPE_INPUTS, SEGPIPE_JOB, SEGPIPE_OUTPUT,
SEGPIPE_SCHEDULER, SEGPIPE_CRON, SEGPIPE_TIMEZONE.
"""

from __future__ import annotations

import argparse
import os
import sys

from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron

from segpipe_flows.archive import archive

NAME = "landcover-nightly"
DEFAULTS = {"inputs": "/data/incoming/*.tif", "job": "/data/jobs/landcover.yaml", "output": "/data/landcover",
            "cron": "0 2 * * *", "timezone": "UTC"}


def landcover_deployment(inputs: str | None = None, job: str | None = None, output: str | None = None,
                         scheduler: str | None = None, cron: str | None = None,
                         timezone: str | None = None) -> RunnerDeployment:
    """The archive flow over ``inputs`` (a glob) into ``output`` every time ``cron`` fires."""
    given = {"inputs": inputs, "job": job, "output": output, "scheduler": scheduler, "cron": cron, "timezone": timezone}
    v = {k: given[k] or os.environ.get(f"SEGPIPE_{k.upper()}") or DEFAULTS.get(k) for k in given}
    params = {k: v[k] for k in ("inputs", "job", "output", "scheduler")}
    schedule = Cron(v["cron"], timezone=v["timezone"])
    return archive.to_deployment(
        name=NAME, schedules=[schedule], parameters=params, tags=["segpipe", "landcover"],
        description="Segment every new scene of the input glob; scenes done before are skipped.",
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Register (and optionally serve) the scheduled land-cover run")
    p.add_argument("--serve", action="store_true", help="serve the deployment: this process runs its flow runs")
    a = p.parse_args(argv)
    deployment = landcover_deployment()
    if a.serve:
        serve(deployment)
    else:
        print(f"deployment {archive.name}/{NAME}: {deployment.apply()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
