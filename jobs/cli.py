"""The ``drray`` command line: a thin layer over the jobs in this package."""

from __future__ import annotations

import difflib
import importlib
import json
import sys
import typing
from pathlib import Path

import click

import drray
from drray.config import ConfigError, DatasetConfig, IdFrom, SyntheticConfig, load_config, run_dir
from drray.progress import configure_logging, log_only, log_to_file
from jobs.stages import STAGES, check_oof

# Jobs that `drray run JOB --config CFG` knows besides the stages (jobs.stages.STAGES): the
# commands that run several stages. name -> (module:function, one-line description).
COMPOSITE_JOBS = {
    "pipeline": ("jobs.pipeline:run", "every stage, then evaluate and RUN/report.md (finished stages skipped)"),
    "table1": ("jobs.table1:run", "every row of the paper's Table 1 (pipeline + FixMatch, MixMatch, supervised at 100%)"),
    "sweep": ("jobs.sweep:run", "the pipeline over sweep.fractions x sweep.seeds (Ray Tune), one shared pretraining"),
}


def _jobs() -> dict[str, tuple[str, str]]:
    jobs = {s.name: (s.runner, s.what) for s in STAGES.values()}
    jobs.update({alias: (s.runner, f"the {s.name} stage (older name)") for s in STAGES.values() for alias in s.aliases})
    return {**jobs, **COMPOSITE_JOBS}


JOBS = _jobs()
# drray.data.sources.SOURCES, read from the config's type (importing the sources would load
# the image libraries on every command)
SOURCE_CHOICES = typing.get_args(typing.get_type_hints(DatasetConfig)["source"])

EXAMPLES = """
\b
Examples:
  drray synth data/raw/eyepacs --n 2000 --test-n 400 --style eyepacs --seed 0
  drray prepare --source eyepacs --images data/raw/eyepacs \\
      --labels trainLabels.csv --labels testLabels.csv --out data/prepared/eyepacs
  drray run prepare --config configs/demo.yaml --set data.size=96
"""


class SuggestingGroup(click.Group):
    """A command group that answers a mistyped command with the closest ones."""

    def resolve_command(self, ctx, args):
        name = args[0] if args else None
        if name is not None and self.get_command(ctx, name) is None and not name.startswith("-"):
            close = difflib.get_close_matches(name, self.list_commands(ctx), n=2)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise click.UsageError(f"no command {name!r}{hint} (commands: {', '.join(self.list_commands(ctx))})", ctx)
        return super().resolve_command(ctx, args)


class JobChoice(click.Choice):
    """A job name: a mistyped one gets the closest jobs in its error."""

    def convert(self, value, param, ctx):
        if value not in self.choices:
            close = difflib.get_close_matches(value, list(self.choices), n=2)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            self.fail(f"no job {value!r}{hint} (jobs: {', '.join(self.choices)})", param, ctx)
        return value


@click.group(cls=SuggestingGroup, epilog=EXAMPLES, invoke_without_command=True,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(drray.__version__, prog_name="drray")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """drray: diabetic-retinopathy screening models from few labels and many unlabeled images.

    SimCLR pretraining -> teacher fine-tuning -> pseudo-labels -> student distillation ->
    student fine-tuning, as Ray jobs that run on a laptop CPU and on SLURM clusters.
    """
    configure_logging(verbose)
    if ctx.invoked_subcommand is None:  # `drray` alone: what it can do, not an error
        click.echo(ctx.get_help())


@main.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--n", "n", type=click.IntRange(1), default=1000, show_default=True,
              help="Images to write (EyePACS style: into train/).")
@click.option("--style", type=click.Choice(["eyepacs", "messidor2"]), default="eyepacs", show_default=True,
              help="eyepacs: train/<id>.jpeg + trainLabels.csv; messidor2: images/ + messidor_data.csv "
                   "(Krause columns), a different camera for external testing.")
@click.option("--test-n", type=click.IntRange(0), default=0, show_default=True,
              help="EyePACS style only: also write test/ + testLabels.csv (with Usage) of this size.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same images.")
@click.option("--original-size", is_flag=True,
              help="EyePACS-sized frames (3888x2592 JPEGs), for the preparation benchmark.")
@click.option("--workers", type=click.IntRange(1), default=None, help="Processes (default: all cores).")
def synth(out: Path, n: int, style: str, test_n: int, seed: int, original_size: bool, workers: int | None) -> None:
    """Write a synthetic fundus data set to OUT in the layout of the real one.

    Grades 0-4 in EyePACS proportions (73.5/7.0/15.1/2.5/2.0 %); lesions by grade; camera
    variety (frame size, cut circles, exposure, blur, colour cast, noise, notches).
    """
    from drray.data.synthetic import write_dataset

    if test_n and style != "eyepacs":
        raise click.UsageError("--test-n applies to --style eyepacs only")
    spec = SyntheticConfig(n=n, test_n=test_n, style=style, seed=seed, original_size=original_size)
    try:
        summary = write_dataset(out, spec, workers=workers)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    grades = ", ".join(f"{g}: {c}" for g, c in summary["grades"].items())
    click.echo(f"wrote {summary['images']} images to {out} (grades {grades}; labels: "
               f"{', '.join(summary['label_files'])})")


@main.command()
@click.option("--source", type=click.Choice(SOURCE_CHOICES), required=True,
              help="Label format: eyepacs (trainLabels.csv / testLabels.csv: image,level[,Usage]), "
                   "messidor2 (Krause messidor_data.csv), folder (CSV image_id,grade[,split][,patient_id][,dme], "
                   "split one of train/val/test, any case; valid and validation mean val; dme 0-2, the "
                   "risk of macular oedema); the public sets as they "
                   "unpack, their label files found without --labels: aptos (APTOS 2019: train.csv, "
                   "train_images/; test_images/ as unlabeled training images), idrid (IDRiD disease "
                   "grading: B. Disease Grading/; ids train/IDRiD_001, test/IDRiD_001), ddr (DDR: "
                   "DR_grading/; grade 5 rejected as ungradable).")
@click.option("--images", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder searched recursively; every file in it is an input (hidden files and the "
                   "label files aside): .jpeg/.jpg/.png/.tif/.tiff/.bmp/.webp images are prepared, "
                   "other files rejected as unsupported_format. aptos, idrid, ddr: the folder the set "
                   "unpacks to; only its image folders are searched.")
@click.option("--id-from", type=click.Choice(typing.get_args(IdFrom)), default="stem", show_default=True,
              help="An image's id: its file stem (left), or its path under --images without the "
                   "extension (patientA/left), for data sets that reuse file names across folders. "
                   "Label rows name images the same way (patientA/left or patientA/left.jpg).")
@click.option("--labels", "labels", multiple=True, type=click.Path(path_type=Path),
              help="Label CSV (repeatable); a relative path is also looked up inside --images. "
                   "Images without a label row, or with an empty grade, are kept as unlabeled. "
                   "aptos, idrid, ddr: optional (their own label files are read).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output: OUT/shards/*.parquet, OUT/rejects.parquet, OUT/manifest.json. Must lie "
                   "outside --images and be new, empty or a prepared set drray wrote (then replaced "
                   "once the new one is complete; a run that prepares nothing keeps it).")
@click.option("--size", type=click.IntRange(16), default=299, show_default=True,
              help="Output side in pixels; the fundus circle's diameter spans it (299: the paper).")
@click.option("--format", "image_format", type=click.Choice(["jpeg", "png"]), default="jpeg", show_default=True,
              help="Encoding of the prepared images (JPEG quality 95 or lossless PNG).")
@click.option("--partition", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="CSV image_id,split that sets each image's split (drray partition's, or the Voets "
                   "et al. partition); checked against the manifest drray partition wrote beside it.")
@click.option("--test-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Pool all images and draw a seeded train/test partition with this share of the "
                   "patients as test (as drray partition does; EyePACS 10_left/10_right are patient 10).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --test-fraction.")
@click.option("--patients", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="CSV image_id,patient_id (e.g. Messidor-2's exams; ids as label rows name images): each "
                   "shard row's patient_id, so that splits and label subsets keep a patient's images "
                   "together. Without it: a folder CSV's patient_id column, EyePACS 10_left -> 10, else "
                   "each image is its own patient (APTOS, IDRiD, DDR publish no patients).")
@click.option("--num-cpus", type=click.IntRange(1), default=None, help="CPUs of the local Ray instance.")
@click.option("--strict", is_flag=True, help="Exit non-zero if any input was rejected.")
def prepare(source, images, id_from, labels, out, size, image_format, partition, test_fraction, seed, patients,
            num_cpus, strict) -> None:
    """Prepare raw fundus photographs: find the fundus, centre, crop, resize, write Parquet shards.

    Runs as a Ray Data job (decoding at reduced scale in parallel). Every input is accounted
    for: prepared + rejected = inputs; each reject has a reason in OUT/rejects.parquet. Exits 0
    when at least one image was prepared.
    """
    from drray.data.prepare import PrepareParams
    from drray.distributed.prepare import prepare_source
    from jobs.prepare import format_summary

    params = PrepareParams(size=size, image_format=image_format)
    try:
        manifest = prepare_source(source=source, images=images, labels=list(labels), out=out, params=params,
                                  id_from=id_from, partition=str(partition) if partition else None,
                                  test_fraction=test_fraction, seed=seed, num_cpus=num_cpus, patients=patients)
    except (ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    counts = manifest["counts"]
    click.echo(format_summary(counts, str(out)))
    if counts["prepared"] == 0:
        raise click.ClickException(f"no image could be prepared; see {out}/rejects.parquet")
    if strict and counts["rejected"]:
        click.echo(f"--strict: {counts['rejected']} input(s) rejected", err=True)
        sys.exit(3)


@main.command()
@click.option("--prepared", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="A prepared set (drray prepare's --out): partition its images, whatever split they had.")
@click.option("--source", type=click.Choice(SOURCE_CHOICES), default=None,
              help="With --images: partition a raw data set's ids instead, those drray prepare would try "
                   "(the inputs not rejected before decoding), as its --test-fraction does.")
@click.option("--images", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The raw data set's folder, as for drray prepare.")
@click.option("--labels", "labels", multiple=True, type=click.Path(path_type=Path),
              help="The raw data set's label files, as for drray prepare (repeatable).")
@click.option("--id-from", type=click.Choice(typing.get_args(IdFrom)), default="stem", show_default=True,
              help="The raw data set's id rule, as for drray prepare.")
@click.option("--test-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), required=True,
              help="Share of the patients (with all their images) put in test.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same ids, seed and patients: same partition.")
@click.option("--patients", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="CSV image_id,patient_id: the images of a patient stay together. Without it (and for ids "
                   "it lacks) EyePACS 10_left/10_right are patient 10, and any other image is its own patient.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The partition, CSV image_id,split; its manifest goes beside it (p.csv: p.manifest.json). "
                   "Must be new or a partition drray wrote there, unchanged since.")
def partition(prepared, source, images, labels, id_from, test_fraction, seed, patients, out) -> None:
    """Write a seeded train/test partition by patient, to share by file and check by hash.

    OUT holds image_id,split; the manifest beside it the seed, the test fraction, the counts and
    the SHA-256 of the sorted ids. Use it with drray prepare --partition OUT (or
    data.<name>.partition: OUT), which fails if the file no longer matches its manifest.
    """
    from drray.data.splits import (
        check_partition_out,
        partition_manifest_path,
        random_partition,
        read_patients,
        write_partition,
    )

    if (prepared is None) == (images is None) or (images is None) != (source is None):
        raise click.UsageError("give --prepared DIR, or --source and --images of a raw data set")
    try:
        check_partition_out(out)
        ids, drawn_from, known = _partition_ids(prepared, source, images, list(labels), id_from, out)
        patient_of = {**known, **(read_patients(patients) if patients else {})}
        mapping = random_partition(ids, test_fraction, seed, patient_of)
        manifest = write_partition(out, mapping, seed=seed, test_fraction=test_fraction, patients=patient_of,
                                   patients_file=patients, drawn_from=drawn_from)
    except (ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    images_by, patients_by = manifest["counts"]["by_split"], manifest["counts"]["patients_by_split"]
    click.echo(f"wrote {out}: {images_by.get('train', 0)} train / {images_by.get('test', 0)} test images "
               f"({patients_by.get('train', 0)} / {patients_by.get('test', 0)} patients); manifest "
               f"{partition_manifest_path(out)} (ids SHA-256 {manifest['ids_sha256']})")


def _partition_ids(prepared: Path | None, source: str | None, images: Path | None, labels: list[Path],
                   id_from: str, out: Path) -> tuple[list[str], dict, dict[str, str]]:
    """The ids a partition is drawn over, where they came from (for the manifest), and each
    one's patient as the data set knows it (the shards', or the source's: exam file, CSV column)."""
    if prepared is not None:
        from drray.data.shards import read_index

        index = read_index(prepared, ["image_id", "patient_id"]).to_pydict()
        ids, known = index["image_id"], dict(zip(index["image_id"], index["patient_id"], strict=True))
        drawn_from = {"prepared": str(prepared)}
    else:
        from drray.data.sources import collect_inputs

        if images.resolve() in out.resolve().parents:  # the file would become an input of the set
            raise click.UsageError(f"--out {out} lies inside --images {images}: write the partition elsewhere")
        report = collect_inputs(source, images, labels, id_from)
        ids = [i.image_id for i in report.items if not i.reject]
        known = {i.image_id: i.patient_id for i in report.items if not i.reject and i.patient_id}
        drawn_from = {"source": source, "images": str(images), "id_from": id_from,
                      "label_files": [str(p) for p in report.label_files]}
    if not ids:
        raise click.ClickException(f"no images to partition in {prepared or images}")
    return ids, drawn_from, known


@main.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("job", type=JobChoice(sorted(JOBS)), metavar="JOB")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="YAML config (configs/demo.yaml, configs/ci.yaml, configs/paper.yaml, ...).")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a config value (repeatable), e.g. --set run.dir=/scratch/run1.")
def run(job: str, config_path: Path, overrides: tuple[str, ...]) -> None:
    """Run JOB locally (or on the Ray cluster in RAY_ADDRESS) with a config.

    \b
    Jobs:
    """
    try:
        cfg = checked_config(config_path, overrides, job)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    with log_to_file(run_dir(cfg) / RUN_LOG) as log_file:
        try:
            result = job_function(job)(cfg)
        except Exception as exc:  # noqa: BLE001 - one line on the console, the traceback in the log
            line = failure_line(job, exc, log_file)
            from drray.distributed.runtime import release_frames

            release_frames(exc)  # before Ray's exit handler shuts it down (the traceback is in the log)
            raise click.ClickException(line) from exc
    if job == "prepare":
        from jobs.prepare import format_summary

        for counts in result["datasets"].values():
            click.echo(format_summary(counts, counts["prepared_dir"]))
    elif job == "pipeline":
        click.echo(_pipeline_summary(result))
    elif job == "table1":
        click.echo(Path(result["table1"]).read_text())
        click.echo(f"report: {result['report']}; table: {Path(result['table1']).with_suffix('.parquet')}")
    elif job == "sweep":
        click.echo(Path(result["sweep"]).read_text())
        click.echo(f"report: {result['report']} (and report.html beside it); table: {result['run_dir']}/sweep.parquet")
    else:
        click.echo(json.dumps(result, indent=2, default=str))


RUN_LOG = "drray.log"  # in the run directory: every run's log lines, banners and tracebacks


def failure_line(job: str, exc: Exception, log_file: Path) -> str:
    """What the console says when a job fails: the error a user can act on, in one line, out of
    Ray's wrappers (a worker's error arrives inside two or three); the traceback to the log."""
    log_only(f"{job} failed", exc_info=exc)
    text = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
    if "ray" in sys.modules:
        from drray.distributed.runtime import describe, root_cause

        exc = root_cause(exc)
        text = describe(exc)
    if isinstance(exc, (ValueError, FileNotFoundError)) and not type(exc).__name__.startswith("RayTaskError"):
        return f"{exc}"  # drray's own messages say what to do
    return f"{job} failed: {text} (traceback in {log_file})"


# Jobs that load no weights to train from: their settings checks skip weight files.
NO_TRAINING = {"prepare", "evaluate"}


def checked_config(config_path: Path, overrides: tuple[str, ...], job: str):
    """The validated config, every setting checked and the run folders claimed: before any work."""
    from drray.settings import check_settings

    cfg = load_config(config_path, overrides)
    check_settings(cfg, files=job not in NO_TRAINING)
    check_oof(cfg, job)
    claim_run_folders(cfg)
    return cfg


@main.command("config")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="YAML config to resolve (with its base files and --set overrides).")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override a config value.")
@click.option("--defaults", is_flag=True, help="Print every key with its default value instead.")
def config_command(config_path: Path | None, overrides: tuple[str, ...], defaults: bool) -> None:
    """Print a resolved config as YAML (what a job would run with), checked like a job's, without
    running anything; or, with --defaults, every key drray knows with its default."""
    from drray.config import Config, dump_yaml
    from drray.settings import check_settings

    if defaults:
        click.echo(dump_yaml(Config()), nl=False)
        return
    if config_path is None:
        raise click.UsageError("give --config CFG (or --defaults for every key and its default)")
    try:
        cfg = load_config(config_path, overrides)
        check_settings(cfg, files=False)
        check_oof(cfg)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(dump_yaml(cfg), nl=False)


def claim_run_folders(cfg) -> None:
    """The run directory (and a separate stage cache) must be drray's: checked before any work."""
    from drray.artifacts import RESOLVED_CONFIG, claim_folder
    from drray.config import stages_dir

    # What a run directory held before drray marked its folders (any one of them is enough).
    legacy = (RESOLVED_CONFIG, "pipeline.json", "metrics.json", "models", "ray", "data.json", "sweep.json",
              *(f"{name}-??????????" for name in STAGES))
    claim_folder(run_dir(cfg), what="run directory (run.dir)", legacy_signs=legacy)
    if stages_dir(cfg) != run_dir(cfg):
        claim_folder(stages_dir(cfg), what="stage cache (run.stages)", legacy_signs=legacy)


def job_function(job: str):
    module_name, _, function = JOBS[job][0].partition(":")
    return getattr(importlib.import_module(module_name), function)


@main.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("job", type=JobChoice(sorted(JOBS)), metavar="JOB")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="YAML config; its run.dir is where the job writes (and its logs go: RUN/slurm/).")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override a config value.")
@click.option("--profile", default=None,
              help="Cluster profile: a name in slurm/profiles/ (local, gpu-example) or a YAML file path.")
@click.option("--nodes", type=click.IntRange(1), default=None, help="Nodes (one Ray node each).")
@click.option("--gpus-per-node", type=click.IntRange(0), default=None, help="GPUs per node, given to Ray.")
@click.option("--cpus-per-node", type=click.IntRange(1), default=None, help="CPUs per node, given to Ray.")
@click.option("--partition", default=None, help="SLURM partition (checked with sinfo before submitting).")
@click.option("--time", "time_minutes", type=click.IntRange(1), default=None,
              help="Time limit in minutes; near it the job requeues itself and resumes.")
@click.option("--signal-delay", "signal_delay_s", type=click.IntRange(1), default=None,
              help="Seconds before the time limit when SLURM warns the job (it then requeues).")
@click.option("--executor", "cluster", type=click.Choice(["slurm", "local"]), default="slurm", show_default=True,
              help="local: run the job in a background process on this machine (no SLURM).")
@click.option("--array", is_flag=True,
              help="sweep only: the shared stages, then one SLURM array task per trial, then the results.")
@click.option("--array-parallelism", type=click.IntRange(1), default=None, help="--array: tasks at once.")
@click.option("--wait", is_flag=True, help="Follow the job(s) to the end; exit with their status.")
def submit(job, config_path, overrides, profile, nodes, gpus_per_node, cpus_per_node, partition, time_minutes,
           signal_delay_s, cluster, array, array_parallelism, wait) -> None:
    """Submit JOB (the job `drray run JOB` runs) to SLURM through submitit.

    The cluster is the one the SLURM client tools talk to (SLURM_CONF honoured). On N nodes the
    job starts a Ray head on the first and Ray workers on the others, waits for all of them,
    runs, and stops Ray. Near its time limit, or when preempted, it requeues itself and
    resumes from the stage cache and the latest checkpoint. Settings: --profile, then flags.

    \b
    Examples:
      drray submit pipeline --config configs/paper.yaml --profile gpu-example --nodes 4
      drray submit sweep --config configs/sweep-ci.yaml --array --array-parallelism 2 --wait
    """
    from drray.launch import slurm
    from drray.launch.profiles import ProfileError, load_profile
    from jobs import submit as submit_job

    try:
        cfg = checked_config(config_path, overrides, job)
        loaded, source = load_profile(profile)
        chosen = loaded.with_overrides(nodes=nodes, gpus_per_node=gpus_per_node, cpus_per_node=cpus_per_node,
                                       partition=partition, time_minutes=time_minutes,
                                       signal_delay_s=signal_delay_s, array_parallelism=array_parallelism)
        subs = submit_job.submit(job, job_function(job), cfg, config_path, chosen, source,
                                 cluster=cluster, array=array)
    except (ConfigError, ProfileError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(submit_job.describe(subs))
    if wait:
        for line in slurm.follow(subs):
            click.echo(line)
        failed = [f"{s.job_id} {slurm.state(s)[0]}" for s in subs if slurm.state(s)[0] != "COMPLETED"]
        if failed:
            raise click.ClickException(f"not completed: {', '.join(failed)}")


@main.command()
@click.option("--last", type=click.IntRange(1), default=20, show_default=True, help="Show the newest N jobs.")
def jobs(last: int) -> None:
    """The jobs drray submitted (DRRAY_HOME/jobs.jsonl) with their state now.

    States come from squeue / scontrol while SLURM knows the job, then from the job's own
    records; "to running" and "to Ray" are seconds from submission to the job's first start
    and to its Ray cluster being ready.
    """
    from drray.launch import slurm

    subs = slurm.submissions()[-last:]
    if not subs:
        click.echo(f"no jobs submitted yet (registry: {slurm.registry_path()})")
        return
    click.echo(f"{'job':<12} {'name':<14} {'state':<11} {'nodes':>5} {'tries':>5} {'to running':>10} "
               f"{'to Ray':>7}  run dir / detail")
    for s in subs:
        st, detail = slurm.state(s)
        t = slurm.timings(s)
        secs = lambda v: f"{v:.0f} s" if v is not None else "-"  # noqa: E731
        click.echo(f"{s.job_id:<12} {s.name:<14} {st:<11} {s.nodes:>5} {t['attempts']:>5} "
                   f"{secs(t['to_running']):>10} {secs(t['to_ray_ready']):>7}  {s.run_dir}"
                   + (f"  ({detail})" if detail else ""))


@main.command()
@click.argument("job_id")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines until the job ends.")
@click.option("--stream", type=click.Choice(["both", "out", "err"]), default="both", show_default=True,
              help="Which of the job's logs: its stdout (out), its stderr (err: drray's progress lines), or both.")
def logs(job_id: str, follow: bool, stream: str) -> None:
    """Print the logs of JOB_ID (an array id prints every task's), from its first task (the
    head node, where the job runs)."""
    from drray.launch import slurm

    try:
        subs = slurm.find(job_id)
    except LookupError as exc:
        raise click.ClickException(str(exc)) from exc
    if follow:
        for line in slurm.follow(subs, streams=stream):
            click.echo(line)
        return
    for s in subs:
        for path in s.logs(stream):
            click.echo(f"==> {path} <==")
            for line in slurm.LogTail(path).new_lines(complete_only=False):
                click.echo(line)


@main.command()
@click.argument("job_id")
def cancel(job_id: str) -> None:
    """Cancel JOB_ID (scancel; an array id cancels every task). A job that has already ended is
    said to have ended, and the command exits non-zero when nothing was left to cancel."""
    from drray.launch import slurm

    try:
        subs = slurm.find(job_id)
    except LookupError as exc:
        raise click.ClickException(str(exc)) from exc
    cancelled, ended = [], []
    for s in subs:
        try:
            slurm.cancel(s)
            cancelled.append(s.job_id)
        except RuntimeError as exc:
            ended.append(str(exc))
    for line in ended:
        click.echo(line, err=True)
    if not cancelled:
        raise click.ClickException(f"nothing cancelled: job {job_id} had ended")
    click.echo(f"cancelled {', '.join(cancelled)}")


@main.command()
@click.option("--model", "model_dir", type=click.Path(file_okay=False, exists=True, path_type=Path), required=True,
              help="A published model folder: RUN/models/student (or teacher, supervised, fixmatch, mixmatch), "
                   "or a stage's RUN/<stage>-<key>/best (or /model). Not a SimCLR encoder.")
@click.option("--images", type=click.Path(file_okay=False, exists=True, path_type=Path), required=True,
              help="Folder of raw fundus photographs (searched recursively).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Output table, .csv or .parquet: one row per file with its decision (refer / no referral / "
                   "ungradable: retake or refer), prob, threshold and operating point, status and reason, "
                   "warning, and the model's folder and weights hash.")
@click.option("--threshold", type=click.FloatRange(0, 1), default=None,
              help="Referable when prob >= this (default: the operating point stored with the model).")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True,
              help="Images prepared and scored together (memory grows with it).")
@click.option("--patients", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="CSV image_id,patient_id naming each image's patient. Without it (and for ids it lacks) "
                   "EyePACS-style 10_left/10_right are patient 10, any other image its own patient.")
def predict(model_dir: Path, images: Path, out: Path, threshold: float | None, batch_size: int,
            patients: Path | None) -> None:
    """Screen raw fundus photographs: a referral decision for every file.

    The images get the preprocessing the model was trained with (fundus detection, centring,
    resize). Each row says refer / no referral at the model's operating point (named in the
    row), or "ungradable: retake or refer" with the reason for a photograph that cannot be
    graded; grayscale and red-free photographs are flagged in the warning column. Every row
    names the model and the SHA-256 of its weights. OUT.patients.csv (or .parquet) beside it
    decides per patient from the worse eye; a patient with an ungradable image is never cleared.
    """
    from jobs.predict import run as predict_images

    try:
        summary = predict_images(model_dir, images, out, batch_size=batch_size, threshold=threshold,
                                 patients=patients)
    except (ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    reasons = ", ".join(f"{k} {v}" for k, v in summary["not_graded"].items())
    click.echo(f"{summary['images']} files: {summary['referable']} refer, {summary['not_referable']} no referral, "
               f"{summary['ungradable']} ungradable (retake or refer)"
               + (f", {summary['not_photographs']} not photographs" if summary["not_photographs"] else "")
               + (f" [{reasons}]" if reasons else ""))
    if summary["warnings"]:
        click.echo(f"{summary['warnings']} grayscale or red-free photographs: see the warning column "
                   f"(grade them by hand)", err=True)
    click.echo(f"threshold {summary['threshold']:.3f}: {summary['threshold_source']}")
    click.echo(f"model {summary['model']} (weights sha256 {summary['model_sha256'][:12]}...)")
    click.echo("patients: " + ", ".join(f"{n} {decision}" for decision, n in sorted(summary["patients"].items())))
    click.echo(f"wrote {summary['out']} (per image) and {summary['patients_out']} (per patient, worse eye)")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
def report(run_dir: Path) -> None:
    """Rebuild RUN_DIR/report.md and report.html from what the pipeline wrote (reruns nothing)."""
    from drray.report import build

    try:
        result = build(run_dir)
    except FileNotFoundError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"wrote {result['path']} and {result['html']}")


def _pipeline_summary(result: dict) -> str:
    from drray.report import rows_at

    metrics = json.loads((Path(result["run_dir"]) / "metrics.json").read_text())
    lines = ["", f"{'model':<12} {'test set':<14} {'AUC':>6}  95% CI (per image; per patient in the report)"]
    for r in rows_at(metrics, "image"):
        if r["test_set"] != "validation":
            lo, hi = r["auc_ci"]
            lines.append(f"{r['model']:<12} {r['test_set']:<14} {r['auc']:>6.3f}  [{lo:.3f}, {hi:.3f}]")
    ran = [s["stage"] for s in result["stages"] if s["status"] == "ran"]
    lines += ["", f"stages run: {', '.join(ran) or 'none'} (the others were complete)",
              f"report: {result['report']} (and report.html beside it)"]
    return "\n".join(lines)


# (the docstring's lines are indented by 4: the list goes 4 deeper, every line alike)
run.help = (run.help or "").rstrip(" ") + "\n".join(f"        {name:<17} {desc}" for name, (_, desc) in sorted(JOBS.items()))


if __name__ == "__main__":
    main()
