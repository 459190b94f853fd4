from pathlib import Path

import pytest
import yaml

from drray.config import Config, ConfigError, config_from_dict, dump_yaml, load_config, run_dir
from drray.settings import check_settings
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
    # the paper's SGD lr 1e-4 at batch 32, at a GPU-sized batch by the linear scaling rule
    assert (cfg.distill.optim.name, cfg.distill.epochs) == ("sgd", 200) and cfg.distill.batch_size >= 32 * 8
    assert cfg.distill.optim.lr / cfg.distill.batch_size == pytest.approx(1e-4 / 32)
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


# --- every setting checked before any work (ranges, names, files), each message naming key,
# --- value, origin and what is allowed


@pytest.mark.parametrize("item, key, allowed", [
    ("pretrain.epochs=-1", "pretrain.epochs", ">= 1"),
    ("labels.fraction=0", "labels.fraction", "(0, 1]"),
    ("labels.fraction=1.5", "labels.fraction", "(0, 1]"),
    ("data.size=0", "data.size", ">= 16"),
    ("distill.batch_size=0", "distill.batch_size", ">= 1"),
    ("finetune.optim.lr=0", "finetune.optim.lr", "> 0"),
    ("pretrain.augment.blur_prob=1.2", "pretrain.augment.blur_prob", "[0, 1]"),
    ("pretrain.augment.crop_scale=[0.0,1.0]", "pretrain.augment.crop_scale", "(0, 1]"),
    ("pseudolabel.concurrency=0", "pseudolabel.concurrency", ">= 1"),
    ("sweep.fractions=[0.1,2]", "sweep.fractions", "(0, 1]"),
    ("evaluate.sensitivities=[0.9,1.0]", "evaluate.sensitivities", "(0, 1)"),
])
def test_out_of_range_values_name_key_value_origin_and_range(item, key, allowed):
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs" / "ci.yaml", [item])
    message = str(err.value)
    assert message.startswith(f"--set {item}: key '{key}'"), message
    assert item.partition("=")[2].split(",")[0].strip("[") in message and allowed in message


def test_a_file_value_out_of_range_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: " + str(REPO / "configs" / "ci.yaml") + "\npretrain:\n  epochs: 0\n")
    with pytest.raises(ConfigError, match=rf"^{bad}:3: key 'pretrain.epochs': 0 is out of range"):
        load_config(bad)


def test_a_mistake_in_a_base_file_is_placed_in_that_file(tmp_path):
    base = _write(tmp_path, "run:\n  seed: 1\n\nsupervised:\n  backbone: resnet181\n")
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {base.name}\npretrain:\n  epochs: 2\n")
    with pytest.raises(ConfigError, match=rf"^{base}:5: key 'supervised.backbone': unknown backbone"):
        check_settings(load_config(child))
    child.write_text(f"base: {base.name}\nsupervised:\n\n  backbone: resnet1888\n")  # the child's value wins
    with pytest.raises(ConfigError, match=rf"^{child}:4: key 'supervised.backbone'"):
        check_settings(load_config(child))
    typo = _write(tmp_path, "labels:\n  seed: 1\n  fractoin: 0.1\n")
    with pytest.raises(ConfigError, match=rf"^{typo}:3: unknown key 'labels.fractoin'"):
        load_config(typo)


def test_set_mistakes_are_reported_as_set_mistakes():
    with pytest.raises(ConfigError, match=r"^--set 'epochs=3': expected section.key=value"):
        load_config(REPO / "configs" / "ci.yaml", ["epochs=3"])
    with pytest.raises(ConfigError, match=r"^--set pretrain.epochz=3: unknown key 'pretrain.epochz'"):
        load_config(REPO / "configs" / "ci.yaml", ["pretrain.epochz=3"])
    with pytest.raises(ConfigError, match=r"^--set labels.strategy=best: key 'labels.strategy'"):
        load_config(REPO / "configs" / "ci.yaml", ["labels.strategy=best"])


def test_unknown_backbones_and_missing_weights_fail_before_any_work(tmp_path):
    from drray.settings import check_settings

    def check(*items, files=True):
        check_settings(load_config(REPO / "configs" / "ci.yaml", list(items)), files=files)

    with pytest.raises(ConfigError, match=r"^--set supervised.backbone=resnet181: key 'supervised.backbone': "
                                          r"unknown backbone 'resnet181' \(choose one of: .*resnet18"):
        check("supervised.backbone=resnet181")
    with pytest.raises(ConfigError, match="'distill.weights' is not set, but distill.init is imagenet"):
        check("distill.init=imagenet")
    check("distill.init=imagenet", files=False)  # prepare needs no weights
    with pytest.raises(ConfigError, match="'finetune.start_from': '/nowhere' is neither a stage"):
        check("finetune.start_from=/nowhere")
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    check("distill.init=imagenet", f"distill.weights={weights}")
    check("finetune.start_from=none", "finetune.backbone=resnet18")
    with pytest.raises(ConfigError, match=r"'fixmatch.backbone' is 'resnet50', but fixmatch.init is pretrained: it "
                                          r"starts from the pretraining's 'resnet18' backbone"):
        check("fixmatch.init=pretrained", "fixmatch.backbone=resnet50")
    check("mixmatch.init=pretrained", "mixmatch.backbone=resnet18")
    for name in ("ci", "demo", "sweep-ci", "paper"):
        check_settings(load_config(REPO / "configs" / f"{name}.yaml"), files=name != "paper")


def test_the_cli_checks_settings_before_it_creates_or_starts_anything(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import drray.distributed.runtime as runtime
    from jobs.cli import main

    monkeypatch.setattr(runtime, "ensure_ray", lambda *a, **k: pytest.fail("Ray started before the check"))
    run = tmp_path / "run"
    for item in ("pretrain.epochs=-1", "labels.fraction=1.5", "supervised.backbone=resnet181"):
        result = CliRunner().invoke(main, ["run", "pipeline", "--config", str(REPO / "configs" / "ci.yaml"),
                                           "--set", f"run.dir={run}", "--set", item])
        assert result.exit_code == 1 and f"--set {item}" in result.output, result.output
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
        assert not run.exists()


def test_every_method_of_a_paper_config_starts_alike():
    """paper.yaml starts every method from ImageNet weights, as the authors did; paper-scratch.yaml
    every one from random weights, with settings checked (no weight file needed)."""
    trained_from_init = ("pretrain", "distill", "supervised", "fixmatch", "mixmatch")
    paper = load_config(REPO / "configs" / "paper.yaml")
    assert {getattr(paper, s).init for s in trained_from_init} == {"imagenet"}
    assert all(getattr(paper, s).weights for s in trained_from_init)
    scratch = load_config(REPO / "configs" / "paper-scratch.yaml")
    assert {getattr(scratch, s).init for s in trained_from_init} == {"random"}
    assert scratch.pretrain.optim.name == "lars"
    # one rule: DenseNet's lr 0.1 at batch 256, scaled linearly to each method's batch
    assert scratch.distill.optim.lr / scratch.distill.batch_size == pytest.approx(
        scratch.supervised.optim.lr / scratch.supervised.batch_size)
    assert (scratch.data, scratch.labels, scratch.pretrain.epochs) == (paper.data, paper.labels, paper.pretrain.epochs)
    check_settings(scratch, files=True)


def test_a_removed_key_says_what_replaced_it(tmp_path):
    with pytest.raises(ConfigError, match=r"key 'labels.val_count' was removed: validation images are part of the "
                                          r"label budget .* set labels.validation"):
        load_config(REPO / "configs" / "ci.yaml", ["labels.val_count=40"])


def test_table1_seeds_are_label_seeds_each_given_once():
    ci = REPO / "configs" / "ci.yaml"
    assert load_config(ci).table1.seeds == ()  # one draw: labels.seed, the rows in RUN itself
    assert load_config(ci, ["table1.seeds=[0, 1]"]).table1.seeds == (0, 1)
    assert load_config(REPO / "configs" / "demo.yaml").table1.seeds == (0, 1, 2)
    for item, message in (("table1.seeds=[0, 2, 2]", r"--set table1.seeds=\[0, 2, 2\]: key 'table1.seeds': \[0, 2, 2\] "
                                                     r"repeats seed 2; give each seed once"),
                          ("table1.seeds=[-1]", r"key 'table1.seeds': \(-1,\) is out of range \(allowed: >= 0\)"),
                          ("table1.seeds=[a]", r"key 'table1.seeds\[0\]': expected int")):
        with pytest.raises(ConfigError, match=message):
            load_config(ci, [item])
