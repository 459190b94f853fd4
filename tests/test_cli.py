"""CLI conventions (no Ray, no SLURM): `drray` alone helps, mistyped jobs and commands get the
closest names, `drray config` prints what a job would run with, and `drray submit` on a machine
without SLURM says so in one line."""

import yaml
from click.testing import CliRunner

from jobs.cli import main
from tests.conftest import REPO

CI = str(REPO / "configs" / "ci.yaml")


def test_drray_alone_prints_its_help_and_succeeds():
    result = CliRunner().invoke(main, [])
    assert result.exit_code == 0 and "Commands:" in result.output and "submit" in result.output


def test_a_mistyped_job_or_command_gets_the_closest_names():
    result = CliRunner().invoke(main, ["run", "pipline", "--config", CI])
    assert result.exit_code == 2 and "no job 'pipline'; did you mean 'pipeline'?" in result.output
    result = CliRunner().invoke(main, ["sumbit"])
    assert result.exit_code == 2 and "no command 'sumbit'; did you mean 'submit'?" in result.output


def test_config_prints_the_resolved_config_and_every_default():
    result = CliRunner().invoke(main, ["config", "--config", CI, "--set", "pretrain.epochs=7"])
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load(result.output)
    assert resolved["pretrain"]["epochs"] == 7 and resolved["data"]["size"] == 32  # ci.yaml's, with the --set
    defaults = yaml.safe_load(CliRunner().invoke(main, ["config", "--defaults"]).output)
    assert defaults["pretrain"]["epochs"] == 100 and defaults["pretrain"]["scaling"]["runtime"] == "auto"
    bad = CliRunner().invoke(main, ["config", "--config", CI, "--set", "labels.fraction=2"])
    assert bad.exit_code == 1 and "--set labels.fraction=2: key 'labels.fraction'" in bad.output


def test_submit_without_slurm_says_so_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sinfo, sbatch, srun here
    monkeypatch.setenv("DRRAY_HOME", str(tmp_path / "home"))
    result = CliRunner().invoke(main, ["submit", "prepare", "--config", CI, "--set", f"run.dir={tmp_path / 'run'}"])
    assert result.exit_code == 1, result.output
    assert "no SLURM client tools" in result.output and "--executor local" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_an_error_inside_a_ray_worker_is_one_line_and_its_traceback_is_in_the_run_log(
        tmp_path, monkeypatch, ray_session):
    """A job whose work fails inside Ray (here a real remote task; a training worker's error
    arrives the same way, wrapped once more) prints the worker's own error in one line; the
    traceback and Ray's start-up notices are in RUN/drray.log, not on the console."""
    import logging

    import jobs.cli

    @ray_session.remote
    def read_shard():
        raise RuntimeError("shard 3 is truncated")

    def job(cfg):
        logging.getLogger("ray._private.authentication.authentication_token_setup").warning("a Ray banner")
        logging.getLogger("ray.data.dataset").warning("Warning: The Ray cluster currently does not have any "
                                                      "available CPUs. The Dataset job will hang unless ...")
        return ray_session.get(read_shard.remote())

    monkeypatch.setattr(jobs.cli, "job_function", lambda name: job)
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["run", "pretrain", "--config", str(REPO / "configs" / "ci.yaml"),
                                       "--set", f"run.dir={run}"])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [f"Error: pretrain failed: RuntimeError: shard 3 is truncated (traceback in {run / 'drray.log'})"]
    log = (run / "drray.log").read_text()
    assert "Traceback" in log and "shard 3 is truncated" in log and "a Ray banner" in log
    assert "The Dataset job will hang" in log  # each epoch's false alarm: kept, off the console


def test_a_notice_filter_with_a_prefix_lets_the_logger_s_other_records_through():
    import logging

    from drray.progress import keep_off_console

    keep_off_console("drray.test.notices", "Warning: noise")
    logger = logging.getLogger("drray.test.notices")
    noise = logger.makeRecord(logger.name, logging.WARNING, __file__, 1, "Warning: noise, every epoch", (), None)
    real = logger.makeRecord(logger.name, logging.WARNING, __file__, 1, "a block could not be read", (), None)
    assert logger.filter(noise) is False and logger.filter(real)


def test_root_cause_unwraps_training_workers_and_controllers():
    from ray.train import ControllerError, WorkerGroupError

    from drray.distributed.runtime import root_cause

    inner = FileNotFoundError("no model weights at /x/model.pt")
    workers = WorkerGroupError("rank 0 and 1 failed", {1: RuntimeError("nccl"), 0: inner})
    assert root_cause(workers) is inner and root_cause(ControllerError(workers)) is inner
    assert root_cause(inner) is inner


def test_run_help_lists_every_job_in_one_column():
    from jobs.cli import JOBS

    lines = CliRunner().invoke(main, ["run", "--help"]).output.splitlines()
    listed = [line for line in lines if line.split()[:1] and line.split()[0] in JOBS]
    assert len(listed) == len(JOBS) and len({len(line) - len(line.lstrip()) for line in listed}) == 1, listed


def test_every_command_and_option_explains_itself():
    import click

    def undocumented(command, path):
        if not command.help:
            yield " ".join(path)
        for param in command.params:
            if isinstance(param, click.Option) and not param.help:
                yield f"{' '.join(path)} {param.opts[0]}"
        for name, sub in getattr(command, "commands", {}).items():
            yield from undocumented(sub, [*path, name])

    assert list(undocumented(main, ["drray"])) == []


def test_an_actor_that_died_in_its_constructor_is_described_by_the_error_it_raised(ray_session):
    from drray.distributed.runtime import describe, root_cause

    @ray_session.remote
    class Model:
        def __init__(self):
            raise IndentationError("expected an indented block (fundus.py, line 339)")

        def ping(self):
            return 1

    try:
        ray_session.get(Model.remote().ping.remote())
    except Exception as exc:  # noqa: BLE001 - whatever Ray raises, the line must name the cause
        assert describe(root_cause(exc)).endswith("expected an indented block (fundus.py, line 339)")
        assert "IndentationError" in describe(root_cause(exc))
    else:
        raise AssertionError("the actor's constructor did not fail")


def test_a_failed_job_lets_go_of_its_half_read_streams_before_ray_shuts_down(tmp_path, monkeypatch):
    """A traceback keeps the failed job's frames, and the Ray Data iterators in them, alive;
    finalized only at exit, after Ray's shutdown, they started a new Ray (a failed FixMatch on
    the demo hung the CLI for 10 minutes). The CLI lets go of them once the traceback is logged."""
    import jobs.cli

    closed = []

    def stream():
        try:
            yield from range(10)
        finally:
            closed.append(True)

    def failing_job(cfg):
        batches = stream()
        next(batches)
        raise ValueError("a step failed")

    monkeypatch.setattr(jobs.cli, "job_function", lambda job: failing_job)
    result = CliRunner().invoke(main, ["run", "supervised", "--config", str(REPO / "configs" / "ci.yaml"),
                                       "--set", f"run.dir={tmp_path / 'run'}"], standalone_mode=False)
    assert "a step failed" in str(result.exception) and result.exception.__cause__ is not None  # still held
    assert closed == [True]
    assert "ValueError: a step failed" in (tmp_path / "run" / "drray.log").read_text()  # logged before


def test_releasing_a_failures_frames_closes_what_they_held():
    from drray.distributed.runtime import release_frames

    closed = []

    def stream():
        try:
            yield 1
        finally:
            closed.append(True)

    def fail():
        held = stream()
        next(held)
        raise RuntimeError("inner")

    try:
        try:
            fail()
        except RuntimeError as inner:
            raise ValueError("outer") from inner
    except ValueError as exc:
        assert closed == []  # the traceback keeps the generator suspended
        release_frames(exc)
        assert closed == [True]
        assert "in fail" in "".join(__import__("traceback").format_exception(exc))  # it still formats
