"""Checks of a whole config that need more than its types and ranges (``drray.config`` checks
those): backbone names the model zoo knows, and weight files and checkpoints that must exist.
Run before any work starts, so a typo costs a second, not a Ray start-up and a failed stage."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from drray.config import Config, ConfigError, FinetuneConfig
from drray.models.backbones import BACKBONE_NAMES

START_FROM_STAGES = ("pretrain", "distill", "none")


def check_settings(cfg: Config, *, files: bool = True) -> None:
    """Raise :class:`ConfigError` naming the key, its value, where it came from (the config file
    or the ``--set``) and what is allowed. ``files``: also check the weight files and checkpoints
    that training would load (a job that trains nothing, such as prepare, does not need them)."""
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if not hasattr(section, "backbone"):
            continue
        if isinstance(section, FinetuneConfig):
            if files:
                _check_start(cfg, f.name, section)
            if section.start_from != "none":
                continue  # backbone, init and weights come from the model it starts from
        _check_backbone(cfg, f.name, section, files)


def _where(cfg: Config, key: str) -> str:
    return cfg.origin().of(key)


def _check_backbone(cfg: Config, name: str, section, files: bool) -> None:
    if section.backbone not in BACKBONE_NAMES:
        raise ConfigError(f"{_where(cfg, name + '.backbone')}: key '{name}.backbone': unknown backbone {section.backbone!r} "
                          f"(choose one of: {', '.join(BACKBONE_NAMES)})")
    if section.init == "pretrained" and section.backbone != cfg.pretrain.backbone:  # FixMatch / MixMatch
        raise ConfigError(f"{_where(cfg, name + '.backbone')}: key '{name}.backbone' is {section.backbone!r}, but "
                          f"{name}.init is pretrained: it starts from the pretraining's {cfg.pretrain.backbone!r} "
                          f"backbone; set {name}.backbone={cfg.pretrain.backbone} or {name}.init=random")
    if files and section.init == "imagenet" and not (section.weights and Path(section.weights).is_file()):
        what = "is not set" if not section.weights else f"{section.weights!r} is not a file"
        raise ConfigError(f"{_where(cfg, name + '.weights')}: key '{name}.weights' {what}, but {name}.init is imagenet: give "
                          f"the local file of torchvision's ImageNet weights for {section.backbone} "
                          f"(nothing is downloaded), or set {name}.init=random")


def _check_start(cfg: Config, name: str, section: FinetuneConfig) -> None:
    start = section.start_from
    if start not in START_FROM_STAGES and not Path(start).is_dir():
        raise ConfigError(f"{_where(cfg, name + '.start_from')}: key '{name}.start_from': {start!r} is neither a stage "
                          f"({', '.join(START_FROM_STAGES)}) nor a checkpoint folder")
