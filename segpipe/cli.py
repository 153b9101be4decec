"""Command line: ``segpipe run|validate|plan JOB.yaml``, ``segpipe archive INPUTS JOB.yaml``, ``segpipe train ...``,
``segpipe export-model ...``.

Input problems end with one line on stderr and exit code 2, never a traceback. Results go to stdout,
stage lines to stderr.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from segpipe.errors import InputError

if TYPE_CHECKING:
    from segpipe.periods import PlannedPeriod
    from segpipe.pipeline import Checked
    from segpipe.progress import Reporter


def _overrides(args: argparse.Namespace) -> dict:
    o: dict = {}
    if getattr(args, "output", None):
        o["output"] = str(Path(args.output).resolve())
    if getattr(args, "tile_size", None) is not None:  # 0 is a value to refuse, not "unset"
        o["tile_size"] = args.tile_size
    cluster = {}
    if getattr(args, "scheduler", None) is not None:
        # an existing scheduler in place of whatever cluster the job would make
        cluster.update(kind="scheduler", scheduler=args.scheduler, adapt=None, slurm=None, gateway=None,
                       kubernetes=None)
    if getattr(args, "workers", None) is not None:
        cluster["n_workers"] = args.workers
    if cluster:
        o["cluster"] = cluster
    if getattr(args, "overwrite", False):
        o["overwrite"] = True
    return o


def _plan_period(args: argparse.Namespace) -> PlannedPeriod:
    from segpipe.config import load_job
    from segpipe.periods import plan_period

    return plan_period(load_job(args.job, _overrides(args)), args.period)


def cmd_validate(args: argparse.Namespace) -> int:
    """Check a job as ``run`` would, write nothing, and say what would run."""
    from segpipe.api import check_job

    if args.period:
        plan = _plan_period(args)
        print(f"period:   {plan.label} -> {plan.folder} ({plan.status}{'; recompute' if plan.recompute else ''})")
        if plan.checked is None:
            print("valid: nothing written")
            return 0
        c = plan.checked
    else:
        c = check_job(args.job, _overrides(args))
    from segpipe.runtime.cluster import check_cluster, describe

    check_cluster(c.job.cluster)
    m = c.plan
    print(f"input:    {c.info.path} ({c.info.kind}, {c.info.describe()}, {c.info.count} band(s))")
    if c.info.mosaic is not None:
        mosaic = c.info.mosaic
        print(f"mosaic:   {len(mosaic.items)} item(s), {mosaic.composite} composite, {c.info.crs.to_string()} at "
              f"{abs(c.info.transform.a):g}, anchor {mosaic.anchor}; {len(mosaic.skipped)} left out"
              + "".join(f"\n          left out {k}: {why}" for k, why in mosaic.skipped)
              + "".join(f"\n          resampled {k}: {why}" for k, why in mosaic.resampled))
    print(f"method:   {m.name} ({m.n_classes} classes: {', '.join(m.class_names)})"
          + (f"; model grid at {' x '.join(f'{s:g}' for s in m.scale)} x the scene's pixel size" if m.scale else ""))
    card = m.model.info.get("card") if m.model is not None else None
    if card:
        from segpipe.models.card import ModelCard

        print(f"output:   {ModelCard.model_validate(card).describe()}")
    print(_tiling_line(c))
    print(f"truth:    {c.job.truth.path if c.job.truth else 'none'}")
    print(f"cluster:  {describe(c.job.cluster)}")
    print("valid: nothing written")
    return 0


def _tiling_line(c: Checked) -> str:
    """How the scene is cut, in its own words: ``tiles:    512 px`` of an image, ``blocks:   64 voxels`` a side of
    a volume (a volume's tile is a cubic block, and "px" misread it as a 2-D tile)."""
    from segpipe.tiling.grid import TileGrid

    geo = c.geometry
    n = len(TileGrid(c.info.shape, c.job.tile_size))
    size = f"{c.job.tile_size} voxels a side" if geo.is_volume else f"{c.job.tile_size} px"
    return f"{geo.tile_word + 's:':<10}{size} ({n} {geo.tile_word}{'s' if n != 1 else ''}), output {c.job.output}"


def cmd_run(args: argparse.Namespace) -> int:
    """Check the job, run it (a thin caller of :mod:`segpipe.api`), print where the results are."""
    from segpipe.api import check_job, execute
    from segpipe.progress import Reporter

    reporter = None if args.quiet else Reporter(sys.stderr)  # stage lines and progress on stderr; -q: none
    if args.period:
        return _run_period(args, reporter)
    from segpipe.config import load_job
    from segpipe.io.lease import OutputBusy, wait_free

    job = load_job(args.job, _overrides(args))
    if job.busy == "wait":
        wait_free(job.output, job.store_root, say=reporter.say if reporter else lambda _line: None)
    try:
        checked = check_job(job)
        outcome = execute(checked, reporter=reporter)
    except OutputBusy as busy:
        if job.busy != "skip":
            raise
        print(f"skipped:      {busy}")  # busy: skip, as the job says
        return 0
    for path in outcome.exports:
        print(f"export:       {path}")
    print(f"zarr result:  {outcome.result}")
    if outcome.item is not None:
        print(f"stac item:    {outcome.item}")
    if outcome.report is not None:
        from segpipe.report.tables import format_summary  # pandas: over 0.3 s of start-up a job without truth skips

        print(f"metrics:      {checked.layout.metrics_dir}")
        print(format_summary(outcome.report))
    elif outcome.objects is not None:
        print(f"objects:      {outcome.objects.summary['objects']} (metrics/objects.csv)")
    return 0


def _run_period(args: argparse.Namespace, reporter: Reporter | None) -> int:
    """One month of a land-cover series, and its change against the month before (see segpipe.periods)."""
    from segpipe.periods import run_period

    done = run_period(_plan_period(args), reporter=reporter)
    print(f"period:       {done.label} ({done.status}, {done.items} item(s)) {done.folder}")
    if done.outcome is not None:
        for path in done.outcome.exports:
            print(f"export:       {path}")
        if done.outcome.report is not None:
            print(f"mean IoU:     {done.outcome.report.summary['global_mean_iou']}")
    if done.areas is not None:
        print("classes:      " + ", ".join(
            f"{r['class']} {r['hectares']:.2f} ha" if "hectares" in r else f"{r['class']} {r['pixels']} px"
            for r in done.areas.summary()["classes"]) + f" ({done.folder / 'metrics' / 'classes.csv'})")
    if done.change is not None:
        print(f"change:       {done.previous} -> {done.label}: {done.change.describe()}")
        for path in done.change.files.values():
            print(f"change:       {path}")
    return 0


def cmd_archive(args: argparse.Namespace) -> int:
    """Every item of a folder or glob through one job template (:mod:`segpipe.archive_run`); a table of items on
    stdout, exit 1 when an item failed (the others still ran)."""
    from segpipe.api import segment_archive

    rows = segment_archive(args.inputs, args.job, args.output, scheduler=args.scheduler, in_flight=args.in_flight,
                   progress=not args.quiet)
    width = max(len(r["item"]) for r in rows)
    for r in rows:
        iou = f"{r['global_mean_iou']:.4f}" if isinstance(r["global_mean_iou"], float) else "-"
        print(f"{r['item']:<{width}}  {iou:>7}  {r['status']}" + (f": {r['error']}" if r["error"] else ""))
    bad = sum(r["status"] == "failed" for r in rows)
    print(f"items:        {len(rows)} ({bad} failed) in {Path(args.output).resolve()}")
    return 1 if bad else 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Plan and price a run before anything runs: tiles, tasks, bytes, store objects, requests and wall time on
    ``--workers`` workers, from measured rates (:mod:`segpipe.plan`); writes nothing. ``--calibrate`` first
    measures the job's method on a crop of its input and writes the user's rates file."""
    from segpipe.config import load_job
    from segpipe.pipeline import check
    from segpipe.plan import Rates, Scenes, calibrate, plan_job, user_rates_path

    overrides: dict = {}
    if args.output:
        overrides["output"] = str(Path(args.output).resolve())
    if args.tile_size is not None:
        overrides["tile_size"] = args.tile_size
    if args.store:
        overrides["store"] = args.store
    for flag in ("workers", "threads", "scenes", "scene_bands", "in_flight"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise InputError(f"--{flag.replace('_', '-')} must be at least 1 (got {value})")
    for flag in ("start_seconds", "price_hour"):
        value = getattr(args, flag)
        if value is not None and value < 0:
            raise InputError(f"--{flag.replace('_', '-')} must not be negative (got {value:g})")
    shape = None
    if args.scene_size:
        sizes = args.scene_size.lower().split("x")
        if len(sizes) not in (2, 3) or not all(v.isdigit() and int(v) > 0 for v in sizes):
            raise InputError(f"--scene-size is WIDTHxHEIGHT (or WIDTHxHEIGHTxDEPTH for volumes), e.g. 7800x7600 "
                             f"(got {args.scene_size!r})")
        shape = tuple(int(v) for v in reversed(sizes))
    rates_path = Path(args.rates).expanduser() if args.rates else user_rates_path()
    if args.rates and not args.calibrate and not rates_path.is_file():
        raise InputError(f"rates file not found: {rates_path} (write it with segpipe plan --calibrate)")
    job = load_job(args.job, overrides)
    workers = args.workers or job.cluster.n_workers
    if args.calibrate:
        done = calibrate(job, rates_path, args.workers or job.cluster.n_workers,
                         args.threads or job.cluster.threads_per_worker, args.gpu)
        print(done.line())
    planned = plan_job(check(job, stores=False), workers, args.gpu, Rates.load(rates_path), threads=args.threads,
                       scenes=Scenes(args.scenes or 1, shape, args.scene_bands), start=args.start_seconds,
                       in_flight=args.in_flight, price_hour=args.price_hour)
    for line in [*planned.lines(), *planned.notes]:
        print(line)
    print("planned: nothing written" + (" but the rates file" if args.calibrate else ""))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from segpipe.methods.train import TrainSpec, train_from_files

    spec = TrainSpec(epochs=args.epochs, patch_size=args.patch_size, batch_size=args.batch_size,
                     base=args.base, lr=args.lr, seed=args.seed, train_cols=args.train_cols,
                     resolution_jitter=args.resolution_jitter)
    remap = {}
    for pair in args.remap or []:
        src, _, dst = pair.partition(":")
        if not (src.strip().lstrip("-").isdigit() and dst.strip().isdigit()):
            raise InputError(f"--remap takes SRC:DST class ids, e.g. 255:1 (got {pair!r})")
        remap[int(src)] = int(dst)
    result = train_from_files(args.image, args.labels, args.out, spec, bands=args.bands,
                              class_names=args.class_names.split(","), binarize=args.binarize, remap=remap)
    print(f"model: {args.out} ({result['parameters']} parameters, final loss {result['final_loss']:.4f})")
    return 0


def cmd_export_model(args: argparse.Namespace) -> int:
    from segpipe.models.export import export_model

    model, card = export_model(args.checkpoint, args.output, args.format, args.patch_size)
    print(f"model: {model}\ncard:  {card}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from segpipe import __version__

    p = argparse.ArgumentParser(prog="segpipe", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"segpipe {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for name, func, text in [("run", cmd_run, "run a segmentation job"),
                             ("validate", cmd_validate, "check a job as run would, and write nothing")]:
        r = sub.add_parser(name, help=text)
        r.add_argument("job", help="job YAML")
        r.add_argument("--output", help="override the output folder")
        r.add_argument("--scheduler", help="Dask scheduler address, e.g. tcp://10.0.0.5:8786")
        r.add_argument("--workers", type=int, help="workers of the LocalCluster")
        r.add_argument("--tile-size", type=int, help="override tile_size")
        r.add_argument("-q", "--quiet", action="store_true", help="no stage lines on stderr (results still print)")
        r.add_argument("-v", "--verbose", action="store_true", help="also Dask's own warnings and log lines")
        r.add_argument("--overwrite", action="store_true",
                       help="replace results in the output made from other input or settings")
        r.add_argument("--period", help="a month of a land-cover series, YYYY-MM or 'last' (the month that ended): "
                                        "the mosaic's items of that month into OUTPUT/period=YYYY-MM/, with the "
                                        "change against the period before")
        r.set_defaults(func=func)
    a = sub.add_parser("archive", help="segment every scene, slide or volume of a folder or glob with one job")
    a.add_argument("inputs", help="a folder (its images, slides, NIfTI files and every DICOM series below it) or a "
                                  "glob")
    a.add_argument("job", help="job YAML template ({name} in its truth path is each item's name)")
    a.add_argument("--output", required=True, help="root folder: one sub-folder per item")
    a.add_argument("--scheduler", help="Dask scheduler address instead of the template's cluster")
    a.add_argument("--in-flight", type=int, help="items at once (default twice the workers)")
    a.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    a.add_argument("-v", "--verbose", action="store_true", help="also Dask's own warnings and log lines")
    a.set_defaults(func=cmd_archive)
    t = sub.add_parser("train", help="train the built-in U-Net on an image and labels")
    t.add_argument("--image", required=True, help="GeoTIFF to train on")
    t.add_argument("--labels", required=True, help="label raster on the same grid, or GeoJSON")
    t.add_argument("--out", required=True, help="checkpoint to write (.pt)")
    t.add_argument("--bands", type=int, nargs="*", help="1-based bands to use (default all)")
    t.add_argument("--class-names", default="background,foreground")
    t.add_argument("--binarize", action="store_true", help="every label > 0 is class 1 (a 0/255 mask)")
    t.add_argument("--remap", nargs="*", metavar="SRC:DST", help="label values to class ids, e.g. 255:1")
    t.add_argument("--epochs", type=int, default=40)
    t.add_argument("--patch-size", type=int, default=128)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--base", type=int, default=16)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--train-cols", type=int, default=None,
                   help="train only on columns < this (the rest is held out for evaluation)")
    t.add_argument("--resolution-jitter", type=float, default=1.0,
                   help="show half the patches as up to this many times coarser, resampled back (robust to "
                        "scenes coarser than the training pixel size; 1 = off)")
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("export-model", help="write a segpipe checkpoint as TorchScript or ONNX with its model card")
    e.add_argument("checkpoint", help="segpipe checkpoint (.pt)")
    e.add_argument("--format", choices=["torchscript", "onnx"], default="torchscript")
    e.add_argument("--output", required=True, help="file to write (its card goes beside it: FILE.card.yaml)")
    e.add_argument("--patch-size", type=int, default=256, help="patch edge to trace the network on")
    e.set_defaults(func=cmd_export_model)
    pl = sub.add_parser("plan", help="plan and price a run before it runs (tiles, tasks, bytes, objects, requests, "
                                     "hours); writes nothing")
    pl.add_argument("job", help="job YAML")
    pl.add_argument("--workers", type=int, help="workers of the cluster planned for (GPU workers with --gpu); "
                                                "default the job's n_workers")
    pl.add_argument("--threads", type=int, help="cores of each worker (with --gpu: CPU threads beside each GPU); "
                                                "default the job's")
    pl.add_argument("--gpu", action="store_true", help="model tasks on one GPU per worker (the rates' gpu entry)")
    pl.add_argument("--scenes", type=int, help="plan N scenes like this one (an archive of N such items)")
    pl.add_argument("--scene-size", help="each scene WIDTHxHEIGHT px (WxHxD voxels) instead of the input's, "
                                         "e.g. 7800x7600 for a Landsat scene")
    pl.add_argument("--scene-bands", type=int, help="bands of each scene instead of the input's")
    pl.add_argument("--rates", help="rates file (default ~/.config/segpipe/rates.yaml where it exists, else the "
                                    "shipped segpipe/sample/rates.yaml)")
    pl.add_argument("--calibrate", action="store_true",
                    help="first run the job's method on a crop of its input in a temporary folder and write its "
                         "measured rates to the rates file")
    pl.add_argument("--start-seconds", type=float, help="seconds before the first stage (a cloud cluster's nodes "
                                                        "starting), instead of the rates' measured start")
    pl.add_argument("--in-flight", type=int, help="scenes at once (default twice the workers, as an archive runs)")
    pl.add_argument("--price-hour", type=float, help="a worker's price per hour (USD): adds the cost line")
    pl.add_argument("--output", help="override the output folder")
    pl.add_argument("--store", help="override store: where the Zarr stores go, e.g. s3://bucket/prefix (nothing "
                                    "is contacted)")
    pl.add_argument("--tile-size", type=int, help="override tile_size")
    pl.set_defaults(func=cmd_plan)
    return p


def quiet_dask(verbose: bool) -> None:
    """Dask's warnings on a normal run (a nanny killing a worker that is closing anyway, ...) are noise to a
    person reading the run; ``-v`` shows them, and Dask's info lines too.

    Importing ``distributed`` sets its loggers' levels from Dask's config, so a level set on the logger before
    that import is undone: the config says it (``DASK_LOGGING__DISTRIBUTED``, read at import here and in the
    worker processes, which inherit the environment), and a logger already imported is set directly.
    """
    level = "info" if verbose else "error"
    os.environ["DASK_LOGGING__DISTRIBUTED"] = level
    if "distributed" in sys.modules:
        import dask

        dask.config.set({"logging.distributed": level})
        logging.getLogger("distributed").setLevel(level.upper())


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    args = build_parser().parse_args(argv)
    quiet_dask(getattr(args, "verbose", False))
    try:
        return args.func(args)
    except InputError as exc:
        print(f"segpipe: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # what the run made (a cluster, its lease) was closed on the way out
        print("segpipe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
