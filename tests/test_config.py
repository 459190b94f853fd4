from pathlib import Path

import pytest
import yaml

from drray.config import Config, ConfigError, config_from_dict, dump_yaml, load_config, run_dir
from tests.conftest import REPO


@pytest.mark.parametrize("name", ["ci", "demo", "paper"])
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert isinstance(cfg, Config)
    assert run_dir(cfg) == Path("runs") / name


def test_paper_config_states_the_paper():
    cfg = load_config(REPO / "configs" / "paper.yaml")
    assert cfg.data.size == 299
    assert cfg.pretrain.backbone == "resnet50" and cfg.distill.backbone == "densenet161"
    assert (cfg.pretrain.optim.lr, cfg.pretrain.optim.weight_decay, cfg.pretrain.batch_size, cfg.pretrain.epochs) == (1e-5, 5e-4, 64, 100)
    assert (cfg.distill.optim.name, cfg.distill.optim.lr, cfg.distill.batch_size, cfg.distill.epochs) == ("sgd", 1e-4, 32, 200)
    assert cfg.student_finetune.epochs == 100
    assert cfg.labels.count == 1000
    assert cfg.pseudolabel.threshold == 0.5
    assert cfg.student_finetune.start_from == "distill" and cfg.supervised.backbone == "inception_v3"


@pytest.mark.parametrize("name", ["ci", "demo", "paper"])
def test_a_partly_given_section_keeps_its_fields_defaults(name):
    """The shipped configs give student_finetune without start_from: it must still start from
    the distilled student (the section's default), not from pretraining (the class default)."""
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert cfg.student_finetune.start_from == "distill"
    assert cfg.finetune.start_from == "pretrain" and cfg.supervised.start_from == "none"
    partial = config_from_dict({"student_finetune": {"epochs": 3, "optim": {"lr": 0.5}}})
    assert partial.student_finetune.start_from == "distill" and partial.student_finetune.epochs == 3
    assert (partial.student_finetune.optim.name, partial.student_finetune.optim.lr) == ("sgd", 0.5)


def test_overrides_apply_and_parse_yaml_scalars(tmp_path):
    cfg = load_config(REPO / "configs" / "ci.yaml", [
        "pretrain.optim.lr=1e-4", "run.dir=/scratch/x", "labels.fraction=0.05", "labels.count=null",
        "pretrain.augment.crop_scale=[0.3, 0.9]", "data.external=null",
    ])
    assert cfg.pretrain.optim.lr == 1e-4
    assert run_dir(cfg) == Path("/scratch/x")
    assert cfg.labels.fraction == 0.05 and cfg.labels.count is None
    assert cfg.pretrain.augment.crop_scale == (0.3, 0.9)
    assert cfg.data.external is None


def test_config_is_frozen():
    cfg = load_config(REPO / "configs" / "ci.yaml")
    with pytest.raises(AttributeError):
        cfg.run.seed = 3  # type: ignore[misc]


def _write(tmp_path, text) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


def test_unknown_key_names_key_file_and_suggests(tmp_path):
    path = _write(tmp_path, "pretrain:\n  optim:\n    lrr: 0.1\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    msg = str(exc.value)
    assert "pretrain.optim.lrr" in msg and str(path) in msg and "'lr'" in msg


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'pretrian'"):
        load_config(_write(tmp_path, "pretrian: {}\n"))


@pytest.mark.parametrize("text, key", [
    ("pretrain: {epochs: ten}\n", "pretrain.epochs"),
    ("pretrain: {epochs: 1.5}\n", "pretrain.epochs"),
    ("pretrain: {optim: {lr: fast}}\n", "pretrain.optim.lr"),
    ("data: {positive: severe}\n", "data.positive"),
    ("pretrain: {gather_negatives: 'yes'}\n", "pretrain.gather_negatives"),
    ("pretrain: {augment: {crop_scale: [0.1]}}\n", "pretrain.augment.crop_scale"),
    ("pretrain: 3\n", "pretrain"),
])
def test_wrong_types_name_the_key(tmp_path, text, key):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert repr(key) in str(exc.value) and str(path) in str(exc.value)


def test_bad_override_names_key():
    with pytest.raises(ConfigError, match="pretrain.epochs"):
        load_config(REPO / "configs" / "ci.yaml", ["pretrain.epochs=many"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(REPO / "configs" / "ci.yaml", ["pretrain.epochs"])
    with pytest.raises(ConfigError, match="unknown key 'data.sise'"):
        load_config(REPO / "configs" / "ci.yaml", ["data.sise=3"])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "a: [1,\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(_write(tmp_path, "- 1\n- 2\n"))


def test_yaml_cannot_run_code(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "run: !!python/object/apply:os.system ['true']\n"))


def test_resolved_config_round_trips():
    cfg = load_config(REPO / "configs" / "paper.yaml")
    again = config_from_dict(yaml.safe_load(dump_yaml(cfg)))
    assert again == cfg


def test_wrong_type_for_an_optional_field_is_a_config_error():
    with pytest.raises(ConfigError, match="labels.fraction"):
        load_config(REPO / "configs" / "ci.yaml", ["labels.fraction=abc"])
