"""Strict checkpoint loading with explicit key maps.

Every checkpoint goes through a named key map (strip DDP's ``module.``, select the backbone) and
then a strict load, so a checkpoint made for another backbone or stage fails loudly with the
offending keys instead of silently leaving layers at their random init.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

DDP_PREFIX = "module."
_SHOW = 10  # keys listed per category in error messages
# Old (pre-1.0 torch) checkpoints lack BatchNorm's step counter; BatchNorm fills it in on load.
_OPTIONAL_SUFFIXES = ("num_batches_tracked",)


class CheckpointMismatch(ValueError):
    """A state dict does not fit the module it is loaded into."""


def _listing(label: str, items: list[str]) -> str:
    shown = ", ".join(items[:_SHOW])
    more = f", ... ({len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return f"  {label} ({len(items)}): {shown}{more}"


def _shape_mismatches(module: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    own = module.state_dict()
    return [
        f"{k} checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)
    ]


def _mismatch_report(module: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    own = module.state_dict().keys()
    missing = [k for k in own if k not in state_dict and not k.endswith(_OPTIONAL_SUFFIXES)]
    unexpected = [k for k in state_dict if k not in own]
    shapes = _shape_mismatches(module, state_dict)
    lines = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
        if items:
            lines.append(_listing(label, items))
    return lines


def load_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """``module.load_state_dict(strict=True)`` with a readable error naming ``what``.

    Checks keys and shapes before touching the module, so a mismatch leaves it unchanged.
    """
    lines = _mismatch_report(module, state_dict)
    if not lines:
        try:
            module.load_state_dict(state_dict, strict=True)
            return
        except RuntimeError as exc:  # anything the pre-check did not foresee
            lines = [f"  {exc}"]
    raise CheckpointMismatch(
        f"checkpoint {what} does not fit {type(module).__name__}:\n"
        + "\n".join(lines)
        + "\n  hint: was this checkpoint made for another backbone or another stage?"
    )


def strip_ddp_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop DistributedDataParallel's leading ``module.`` when every key has it."""
    keys = list(state_dict)
    if keys and all(k.startswith(DDP_PREFIX) for k in keys):
        return {k[len(DDP_PREFIX) :]: v for k, v in state_dict.items()}
    return dict(state_dict)


def backbone_state_from(
    state_dict: Mapping[str, torch.Tensor], prefix: str = "backbone."
) -> dict[str, torch.Tensor]:
    """Bare backbone weights from a SimCLRNet or Classifier state dict.

    Keeps keys under ``prefix`` (stripped) and drops everything else (projection or head).
    """
    state = strip_ddp_prefix(state_dict)
    picked = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not picked:
        found = ", ".join(list(state)[:5]) or "none"
        raise CheckpointMismatch(
            f"no key starts with {prefix!r} (found e.g.: {found}); "
            "expected a SimCLRNet or Classifier state dict"
        )
    return picked
