"""Scheduled runs: Prefect deployments of the land-cover period flow and the archive flow on cron schedules.

    python -m segpipe_flows.deploy --serve          # register and serve both (this process runs the flow runs)
    python -m segpipe_flows.deploy                  # only register them with the Prefect API
    prefect deploy --name landcover-monthly         # the same deployments from prefect.yaml, for a work pool

``landcover-monthly`` runs the land-cover job (a STAC mosaic) for the month that ended, on the first days of
each month: a month with nothing new is skipped, so firing daily is harmless and catches late items.
``archive-nightly`` segments every new file of an input glob. Parameters default from the environment, so one
image serves any site: SEGPIPE_JOB, SEGPIPE_OUTPUT, SEGPIPE_SCHEDULER, SEGPIPE_CRON, SEGPIPE_TIMEZONE
(land cover) and SEGPIPE_INPUTS, SEGPIPE_ARCHIVE_JOB, SEGPIPE_ARCHIVE_OUTPUT, SEGPIPE_ARCHIVE_CRON (archive).
"""

from __future__ import annotations

import argparse
import os
import sys

from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron

from segpipe_flows.archive import archive
from segpipe_flows.landcover import landcover_period

NAME = "landcover-monthly"
ARCHIVE_NAME = "archive-nightly"
DEFAULTS = {"job": "/data/jobs/landcover.yaml", "output": "/data/landcover", "cron": "0 3 1-5 * *",
            "timezone": "UTC", "inputs": "/data/incoming/*.tif", "archive_job": "/data/jobs/archive.yaml",
            "archive_output": "/data/archive", "archive_cron": "0 2 * * *"}


def _settings(**given: str | None) -> dict[str, str | None]:
    return {k: v or os.environ.get(f"SEGPIPE_{k.upper()}") or DEFAULTS.get(k) for k, v in given.items()}


def landcover_deployment(job: str | None = None, output: str | None = None, scheduler: str | None = None,
                         cron: str | None = None, timezone: str | None = None) -> RunnerDeployment:
    """The period flow for the month that ended (``period="last"``) each time ``cron`` fires."""
    v = _settings(job=job, output=output, scheduler=scheduler, cron=cron, timezone=timezone)
    return landcover_period.to_deployment(
        name=NAME, schedules=[Cron(v["cron"], timezone=v["timezone"])], tags=["segpipe", "landcover"],
        parameters={"job": v["job"], "output": v["output"], "period": "last", "scheduler": v["scheduler"]},
        description="The month that ended: mosaic, segmentation, report and change against the month before; "
                    "skipped when nothing new arrived.",
    )


def archive_deployment(inputs: str | None = None, job: str | None = None, output: str | None = None,
                       scheduler: str | None = None, cron: str | None = None,
                       timezone: str | None = None) -> RunnerDeployment:
    """The archive flow over ``inputs`` (a glob) into ``output`` every time ``cron`` fires."""
    v = _settings(inputs=inputs, archive_job=job, archive_output=output, scheduler=scheduler, archive_cron=cron,
                  timezone=timezone)
    return archive.to_deployment(
        name=ARCHIVE_NAME, schedules=[Cron(v["archive_cron"], timezone=v["timezone"])], tags=["segpipe", "archive"],
        parameters={"inputs": v["inputs"], "job": v["archive_job"], "output": v["archive_output"],
                    "scheduler": v["scheduler"]},
        description="Segment every new scene of the input glob; scenes done before are skipped.",
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Register (and optionally serve) the scheduled runs")
    p.add_argument("--serve", action="store_true", help="serve the deployments: this process runs their flow runs")
    a = p.parse_args(argv)
    deployments = [landcover_deployment(), archive_deployment()]
    if a.serve:
        serve(*deployments)
    else:
        for d in deployments:
            print(f"deployment {d.flow_name}/{d.name}: {d.apply()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
