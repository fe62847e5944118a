"""`sodiff-batch`: a thin click front end of `scale.job` (Ray Data) over `runtime.batch`."""
from __future__ import annotations

import sys
from pathlib import Path, PurePosixPath

import click

from runtime.cliopts import CONTEXT_SETTINGS, version_option
from runtime.config import DEFAULT_MAX_PIXELS, DEFAULT_QUALITY

from .cliopts import restore_options
from .config import (DEFAULT_CPUS_PER_WORKER, DEFAULT_RETRIES, DEFAULT_THREADS,
                     DEFAULT_WORKERS, REPORT_NAME)

EXIT_FAILED, EXIT_UNUSABLE = 1, 2


@version_option()
@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("src")
@click.argument("dst")
@click.option("--engine", required=True, type=click.Path(path_type=Path),
              help="Engine dir written by sodiff-export (the same path on every node).")
@click.option("--workers", type=click.IntRange(min=1), default=DEFAULT_WORKERS,
              show_default=True, help="Worker actors, one Restorer each.")
@click.option("--cpus-per-worker", type=click.FloatRange(min=0), show_default=True,
              default=DEFAULT_CPUS_PER_WORKER, help="CPUs Ray reserves per worker "
              "(fractions allowed; under 1 leaves CPUs for Ray Data's own tasks).")
@click.option("--gpus-per-worker", type=click.FloatRange(min=0), default=0.0,
              show_default=True, help="GPUs per worker (0.5: two workers share a GPU).")
@click.option("--address", help="An existing Ray cluster (auto, HOST:6379, ray://HOST:10001). "
                                "Default: a local cluster for this job.")
@click.option("--threads", type=click.IntRange(min=0), default=DEFAULT_THREADS,
              show_default=True, help="onnxruntime CPU threads per worker (0: onnxruntime "
                                      "decides, which oversubscribes shared cores).")
@click.option("--format", "fmt", type=click.Choice(["png", "jpg", "webp"]), default="png",
              show_default=True, help="Output format.")
@click.option("--quality", type=click.IntRange(1, 100), default=DEFAULT_QUALITY,
              show_default=True, help="JPEG/WebP output quality.")
@click.option("--overwrite", is_flag=True, help="Restore every image again, replacing "
                                                "outputs (default: complete ones are skipped).")
@restore_options
@click.option("--max-pixels", type=click.IntRange(min=0), default=DEFAULT_MAX_PIXELS,
              show_default=True, help="Decompression-bomb limit in pixels (0: none).")
@click.option("--report", "report_path", type=click.Path(path_type=Path),
              help=f"JSONL report, one line per image, appended to [default: DST/{REPORT_NAME}, "
                   f"or ./{REPORT_NAME} when DST is a URI].")
@click.option("--retries", type=click.IntRange(min=0), default=DEFAULT_RETRIES,
              show_default=True, help="Reruns of the unfinished images after a worker dies.")
def main(src, dst, engine, workers, cpus_per_worker, gpus_per_worker, address, threads, fmt,
         quality, overwrite, backend, device, tile, overlap, tile_batch, timestep, max_pixels,
         no_verify, no_keep_colour, no_jpeg_constraint, no_gate, report_path,
         retries):
    """Restore every image of SRC into the folder DST on a Ray cluster.

    SRC: a folder (searched recursively), a glob pattern, or a .txt/.lst/.csv file listing
    paths. SRC and DST may be URIs of any file system pyarrow opens (s3://bucket/photos).
    Output names, formats and collision rules are sodiff-run -o DST's. A rerun skips the
    outputs that are already complete, so a killed job resumes where it stopped.
    """
    from runtime.batch import BatchOptions, plan_jobs
    from runtime.config import RestoreOptions
    from runtime.errors import EngineDirError

    from .cluster import ClusterError, check_engine, check_resources, connect, disconnect
    from .config import ClusterOptions, validate_cluster
    from .job import JobError, run_job
    from .sources import find_inputs
    from .storage import files_for, is_uri, open_uri

    cluster = ClusterOptions(address, workers, cpus_per_worker, gpus_per_worker)
    restore = RestoreOptions(backend=backend, device=device, tile=tile, overlap=overlap,
                             tile_batch=tile_batch, timestep=timestep, threads=threads,
                             verify_hashes=not no_verify, keep_colour=not no_keep_colour,
                             jpeg_constraint=not no_jpeg_constraint, gate=not no_gate)
    try:
        validate_cluster(cluster)
        check_engine(engine, restore)
        out = PurePosixPath(open_uri(dst)[1]) if is_uri(dst) else Path(dst).expanduser()
        if isinstance(out, Path) and out.exists() and not out.is_dir():
            raise ValueError(f"DST {dst} is a file; sodiff-batch writes into a folder")
        batch = BatchOptions(out=out, fmt=fmt, quality=quality, overwrite=overwrite,
                             max_pixels=max_pixels)
        found, refused = find_inputs(src)
        if isinstance(out, Path):
            out.mkdir(parents=True, exist_ok=True)
        jobs = refused + plan_jobs(found, batch)
    except (ValueError, EngineDirError, OSError) as e:
        _die(str(e), EXIT_UNUSABLE)
    if not any(j.target for j in jobs):  # nothing to restore: no cluster to start
        _die("; ".join(j.error for j in jobs) if jobs else f"no input images found in {src}",
             EXIT_UNUSABLE)
    say = lambda msg: click.echo(msg, err=True)  # noqa: E731
    report_path = report_path or (out / REPORT_NAME if isinstance(out, Path) else
                                  Path(REPORT_NAME))
    owned = False
    try:
        owned = connect(address)
        check_resources(workers, cpus_per_worker, gpus_per_worker, address is None, say)
        with open(report_path, "a", encoding="utf-8") as report:
            summary = run_job(jobs, str(engine), restore, batch, cluster, report, say, retries,
                              files=files_for(src, dst))
    except (ClusterError, JobError, OSError) as e:
        _die(str(e), EXIT_UNUSABLE)
    finally:
        if owned:
            disconnect()
    click.echo(summary.line(), err=True)
    if summary.failed:
        click.echo("failed:", err=True)
        for reason in summary.failed:
            click.echo(f"  {reason}", err=True)
        sys.exit(EXIT_FAILED)


def _die(message: str, code: int) -> None:
    click.echo(f"error: {message.splitlines()[0] if message else 'unknown error'}", err=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
