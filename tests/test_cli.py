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
