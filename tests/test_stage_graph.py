"""The stage graph (jobs/stages.py) without Ray: every record is complete, resolving creates
nothing, keys follow exactly what a stage depends on, and the one completion rule (done.json
recording its inputs' hashes) redoes a stage whose input was replaced."""

import dataclasses
import json

import pytest

from drray.config import Config, load_config
from jobs import common, stages
from jobs.cli import JOBS
from tests.conftest import REPO

CI = REPO / "configs" / "ci.yaml"
MANIFEST = {"content_hash": "c0ffee"}


def keys(cfg) -> dict[str, str]:
    return {name: r.key for name, r in stages.resolve(cfg, MANIFEST).items()}


@pytest.fixture
def cfg(tmp_path):
    return load_config(CI, [f"run.dir={tmp_path / 'run'}"])


def test_every_stage_record_names_a_section_and_a_runner_that_exist():
    fields = {f.name for f in dataclasses.fields(Config)}
    for s in stages.STAGES.values():
        assert s.section is None or s.section in fields, s
        assert callable(s.function()), s
        assert all(u in stages.STAGES for u in s.upstream), s
        assert s.name in JOBS and all(a in JOBS for a in s.aliases)  # the CLI reads the table
    assert stages.stage("finetune").name == "teacher" and stages.stage("student-finetune").name == "student"
    with pytest.raises(KeyError, match="the stages: prepare, pretrain"):
        stages.stage("pretrian")


def test_resolving_creates_nothing_and_puts_every_stage_in_the_stage_cache(cfg, tmp_path):
    resolved = stages.resolve(cfg, MANIFEST)
    assert not (tmp_path / "run").exists()
    assert {r.dir.path.parent for r in resolved.values()} == {(tmp_path / "run").resolve()}
    assert all(r.dir.name == f"{name}-{r.key}" for name, r in resolved.items())
    order = list(resolved)  # topological: a stage after what it reads
    assert order.index("pretrain") < order.index("teacher") < order.index("pseudolabel") < order.index("distill") \
        < order.index("student")
    assert resolved["student"].upstream == {"distill": resolved["distill"].dir.path}


def test_keys_follow_what_each_stage_depends_on(cfg):
    base = keys(cfg)
    labels = keys(dataclasses.replace(cfg, labels=dataclasses.replace(cfg.labels, seed=7)))
    assert labels["pretrain"] == base["pretrain"]  # SimCLR reads no labels: a sweep shares it
    assert all(labels[s] != base[s] for s in ("teacher", "supervised", "pseudolabel", "distill", "student"))
    pretrain = keys(dataclasses.replace(cfg, pretrain=dataclasses.replace(cfg.pretrain, temperature=0.2)))
    assert pretrain["teacher"] != base["teacher"] and pretrain["student"] != base["student"]  # downstream of it
    assert pretrain["supervised"] == base["supervised"]  # starts from nothing
    assert pretrain["fixmatch"] == base["fixmatch"] and pretrain["mixmatch"] == base["mixmatch"]  # init random
    student = keys(dataclasses.replace(cfg, student_finetune=dataclasses.replace(cfg.student_finetune, epochs=9)))
    assert {s for s in base if student[s] != base[s]} == {"student"}
    data = {name: r.key for name, r in stages.resolve(cfg, {"content_hash": "other"}).items()}
    assert all(data[s] != base[s] for s in base)
    # inference settings that cannot change a pseudo-label leave the pseudolabel stage (and all after) alone
    inference = keys(dataclasses.replace(cfg, pseudolabel=dataclasses.replace(cfg.pseudolabel, batch_size=7)))
    assert inference == base


def test_scaling_settings_added_later_keep_earlier_keys_at_their_defaults(cfg):
    """A run directory made before sync_batchnorm and compile existed keeps its finished stages;
    turning one of them away from its default is a new stage."""
    from drray.config import to_dict

    base = keys(cfg)
    before = {k: v for k, v in to_dict(cfg.pretrain.scaling).items() if k not in ("sync_batchnorm", "compile")}
    assert stages._section_part(cfg, stages.STAGES["pretrain"])["scaling"] == before
    compiled = dataclasses.replace(cfg.pretrain.scaling, compile=True)
    changed = keys(dataclasses.replace(cfg, pretrain=dataclasses.replace(cfg.pretrain, scaling=compiled)))
    assert changed["pretrain"] != base["pretrain"]


def test_what_a_stage_reads_follows_the_config(cfg, tmp_path):
    scratch = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, start_from="none"))
    assert stages.resolve(scratch, MANIFEST)["teacher"].upstream == {}
    table = tmp_path / "mine.parquet"
    theirs = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, pseudolabels=str(table)))
    assert stages.resolve(theirs, MANIFEST)["distill"].upstream == {}
    assert stages.pseudolabels_path(theirs, MANIFEST) == table
    assert stages.pseudolabels_path(cfg, MANIFEST).parent.name.startswith("pseudolabel-")


def test_a_stage_whose_input_was_replaced_is_redone_not_trusted(cfg):
    resolved = stages.resolve(cfg, MANIFEST)
    pretrain, teacher = resolved["pretrain"], resolved["teacher"]
    (pretrain.dir.model).mkdir(parents=True)
    (pretrain.dir.model / "model.pt").write_bytes(b"weights v1")
    teacher.dir.path.mkdir(parents=True)
    (teacher.dir.path / "subset.json").write_text("{}")
    common.finish_stage(cfg, teacher, {"metrics": {"epoch": 1}})
    done = json.loads(teacher.dir.done_file.read_text())
    assert done["inputs"] == {"pretrain": common.inputs_of(cfg, teacher)["pretrain"]}
    assert common.finished(cfg, teacher)["skipped"] is True
    (pretrain.dir.model / "model.pt").write_bytes(b"weights v2")  # the pretraining was replaced
    assert common.finished(cfg, teacher) is None
    assert not teacher.dir.path.exists()  # what it made from the old input is gone; it runs again


def test_a_baseline_started_from_the_pretraining_depends_on_it(cfg):
    """fixmatch/mixmatch.init=pretrained: the pretraining is their upstream, as it is the teacher's
    (its key in theirs, its model's hash in their done.json)."""
    started = dataclasses.replace(cfg, fixmatch=dataclasses.replace(cfg.fixmatch, init="pretrained"),
                                  mixmatch=dataclasses.replace(cfg.mixmatch, init="pretrained"))
    resolved = stages.resolve(started, MANIFEST)
    pretrain = resolved["pretrain"]
    for name in ("fixmatch", "mixmatch"):
        assert resolved[name].upstream == {"pretrain": pretrain.dir.path}
        assert list(resolved).index("pretrain") < list(resolved).index(name)
    changed = keys(dataclasses.replace(started, pretrain=dataclasses.replace(started.pretrain, temperature=0.2)))
    assert changed["fixmatch"] != resolved["fixmatch"].key and changed["mixmatch"] != resolved["mixmatch"].key
    assert keys(started)["fixmatch"] != keys(cfg)["fixmatch"]  # the start is part of the key
    pretrain.dir.model.mkdir(parents=True)
    (pretrain.dir.model / "model.pt").write_bytes(b"weights v1")
    fixmatch = resolved["fixmatch"]
    fixmatch.dir.path.mkdir(parents=True)
    common.finish_stage(started, fixmatch, {"metrics": {"epoch": 1}})
    assert common.finished(started, fixmatch)["skipped"] is True
    (pretrain.dir.model / "model.pt").write_bytes(b"weights v2")  # the pretraining was replaced
    assert common.finished(started, fixmatch) is None


def test_a_fold_of_the_budget_is_its_own_stage_and_unset_keeps_every_key(cfg):
    """labels.fold (the oof stage's) gives every stage that reads labels, and what follows
    them, a key of its own, and shares the pretraining; unset, it is left out of the key, so
    stages made before it existed keep theirs."""
    from drray.config import to_dict

    assert "fold" not in stages.labels_part(cfg) and "fold" in to_dict(cfg.labels)
    assert stages.labels_part(cfg) == {k: v for k, v in to_dict(cfg.labels).items() if k != "fold"}
    base = keys(cfg)
    fold = keys(stages.fold_config(dataclasses.replace(cfg, oof=dataclasses.replace(cfg.oof, folds=3)), 1))
    assert {s for s in base if fold[s] == base[s]} == {"pretrain"}
    other = keys(stages.fold_config(dataclasses.replace(cfg, oof=dataclasses.replace(cfg.oof, folds=3)), 2))
    assert other["teacher"] != fold["teacher"]


def test_out_of_fold_retrains_each_model_with_the_labeled_stages_before_it(tmp_path):
    cfg = load_config(CI, [f"run.dir={tmp_path}", "labels.validation=0", "oof.folds=2",
                           "pipeline.baselines=[fixmatch]"])
    stages.check_oof(cfg)
    assert stages.oof_models(cfg) == ("teacher", "supervised", "fixmatch", "student")
    assert stages.chain_of(cfg, "student") == ["pretrain", "teacher", "pseudolabel", "distill", "student"]
    assert stages.chain_of(cfg, "supervised") == ["supervised"]
    resolved = stages.resolve(cfg, MANIFEST)
    assert set(resolved["oof"].upstream) == {"teacher", "supervised", "fixmatch", "student"}
    chosen = load_config(CI, [f"run.dir={tmp_path}", "labels.validation=0", "oof.folds=2", "oof.models=[student]"])
    assert stages.oof_models(chosen) == ("student",)
    off = stages.resolve(load_config(CI, [f"run.dir={tmp_path}"]), MANIFEST)
    assert off["oof"].upstream == {}  # off: it reads nothing, and nothing is retrained


@pytest.mark.parametrize(("sets", "message"), [
    (["labels.validation=0", "oof.folds=1"], r"--set oof.folds=1: key 'oof.folds' is 1: .* at least 2 folds"),
    (["oof.folds=5"], r"'oof.folds' is 5, but labels.validation is 0.5: .* set labels.validation=0"),
    (["labels.validation=0", "oof.folds=2", "oof.models=[fixmatch]"],
     r"'oof.models': 'fixmatch' is not a model this config trains .* pipeline.baselines"),
    (["labels.fold=[2, 2]"], r"'labels.fold': \[2, 2\] is not \[j, k\]"),
])
def test_out_of_fold_settings_are_refused_before_any_work(tmp_path, sets, message):
    from drray.config import ConfigError

    cfg = load_config(CI, [f"run.dir={tmp_path}", *sets])
    with pytest.raises(ConfigError, match=message):
        stages.check_oof(cfg)


def test_table1_may_name_a_baseline_for_out_of_fold_thresholds(tmp_path):
    cfg = load_config(CI, [f"run.dir={tmp_path}", "labels.validation=0", "oof.folds=2", "oof.models=[fixmatch]"])
    stages.check_oof(cfg, "table1")  # table1 trains every baseline


def test_settings_added_later_leave_table1s_and_the_sweeps_keys_alone(cfg):
    """table1's finished seeds and a sweep's Tune experiment are found by a key over the whole
    config: labels.fold and the oof section, at their defaults, are not in it."""
    from drray.config import to_dict

    before = {k: v for k, v in to_dict(cfg).items() if k not in ("run", "oof")}
    before["labels"] = {k: v for k, v in before["labels"].items() if k != "fold"}
    assert stages.settings_part(cfg, ("run",)) == before
    on = dataclasses.replace(cfg, oof=dataclasses.replace(cfg.oof, folds=2))
    assert stages.settings_part(on, ("run",))["oof"] == {"folds": 2, "models": []}
