"""Figures for the evaluation and the report (matplotlib, no display needed): ROC curves per
test set with every model overlaid, reliability diagrams, t-SNE panels of penultimate features,
training curves, AUC against label fraction for a sweep."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def roc_figure(curves: dict[str, dict], title: str, path: str | Path) -> Path:
    """``curves``: model -> {"targets", "probs", "auc", "auc_ci"}; one line per model."""
    from sklearn.metrics import roc_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    for model, c in curves.items():
        fpr, tpr, _ = roc_curve(c["targets"], c["probs"])
        lo, hi = c["auc_ci"]
        ax.plot(fpr, tpr, label=f"{model}: AUC {c['auc']:.3f} [{lo:.3f}, {hi:.3f}]")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def reliability_figure(panels: dict[str, dict[str, list[dict]]], title: str, path: str | Path) -> Path:
    """Reliability diagrams: observed share of positives against mean predicted probability per
    bin, one line per model, a marker's area its bin's count; the dotted diagonal is perfect
    calibration. ``panels``: panel title -> model -> bins (drray.metrics.reliability_bins)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4.5), squeeze=False)
    for ax, (panel, models) in zip(axes[0], panels.items(), strict=True):
        for i, (model, bins) in enumerate(models.items()):
            found = [b for b in bins if b["n"]]
            total = sum(b["n"] for b in found) or 1
            ax.plot([b["mean_prob"] for b in found], [b["observed"] for b in found], color=f"C{i}", label=model)
            ax.scatter([b["mean_prob"] for b in found], [b["observed"] for b in found], color=f"C{i}",
                       s=[10 + 200 * b["n"] / total for b in found], alpha=0.6)
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        ax.set(xlabel="mean predicted probability", ylabel="observed share referable", title=panel,
               xlim=(0, 1), ylim=(0, 1.01))
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def tsne_figure(panels: dict[str, tuple[np.ndarray, np.ndarray]], title: str, path: str | Path) -> Path:
    """``panels``: model -> (2-D embedding (n, 2), binary targets (n,)): one panel per model."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), squeeze=False)
    for ax, (model, (xy, targets)) in zip(axes[0], panels.items(), strict=True):
        for value, colour, label in ((0, "tab:blue", "non-referable"), (1, "tab:red", "referable")):
            chosen = targets == value
            ax.scatter(xy[chosen, 0], xy[chosen, 1], s=6, alpha=0.6, c=colour, label=label)
        ax.set(title=model, xticks=[], yticks=[])
    axes[0][0].legend(loc="best", fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


# What the training figure draws of a stage's metrics.jsonl epochs: (metric, panel, line style,
# marker, legend suffix). knn_auc is the SimCLR monitor (pretrain.monitor_every): a kNN probe of
# the features, nothing trained on it, so dashed with squares, apart from the classifiers' AUC.
TRAINING_CURVES = (("loss", 0, "-", ".", ""), ("val_auc", 1, "-", ".", ""),
                   ("knn_auc", 1, "--", "s", " kNN probe (features)"))


def training_series(stages: dict[str, list[dict]]) -> list[dict]:
    """The curves of :func:`training_figure`, one per stage and logged metric: stage, metric,
    panel (0 loss, 1 AUC), style, marker, label, colour (a stage keeps its own), and the epochs
    (1-based) with their values, only the epochs that logged the metric (the probe runs every
    few epochs)."""
    out = []
    for i, (stage, records) in enumerate(stages.items()):
        for metric, panel, style, marker, suffix in TRAINING_CURVES:
            points = [(r["epoch"] + 1, r[metric]) for r in records if r.get(metric) is not None]
            if points:
                out.append({"stage": stage, "metric": metric, "panel": panel, "style": style, "marker": marker,
                            "label": stage + suffix, "colour": f"C{i}", "epochs": [e for e, _ in points],
                            "values": [v for _, v in points]})
    return out


def training_figure(stages: dict[str, list[dict]], path: str | Path, published: dict[str, int] | None = None) -> Path:
    """Loss per epoch of each training stage; validation AUC where there is one, and the SimCLR
    features' kNN probe AUC (``knn_auc``, dashed with squares) where pretraining was monitored.
    ``published``: stage -> the epoch (0-based, as logged) whose model the stage handed on,
    marked with a ring and a dotted vertical line in the stage's colour: a curve that goes on
    improving after its marker is not what was evaluated."""
    plt = _pyplot()
    published = published or {}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    series = training_series(stages)
    for c in series:
        ax = axes[c["panel"]]
        ax.plot(c["epochs"], c["values"], linestyle=c["style"], marker=c["marker"], label=c["label"],
                color=c["colour"], gid=c["metric"])
        mark = published.get(c["stage"])
        if mark is not None and mark + 1 in c["epochs"]:
            _mark_epoch(ax, mark + 1, c["values"][c["epochs"].index(mark + 1)], c["colour"])
    axes[0].set(xlabel="epoch", ylabel="training loss", title="training loss", yscale="log")
    probed = any(c["metric"] == "knn_auc" for c in series)
    axes[1].set(xlabel="epoch", ylabel="AUC on the validation hold-out",
                title="validation AUC" + (" (dashed: the SimCLR features' kNN probe)" if probed else ""))
    for ax in axes:
        ax.xaxis.get_major_locator().set_params(integer=True)  # epochs: no 1.5
    if published:  # one legend entry explains every ring
        axes[0].plot([], [], "o", markerfacecolor="none", markeredgecolor="black", label="published epoch")
    for ax in axes:
        if ax.lines:
            ax.legend(fontsize=8)
    return _save(fig, path)


def _mark_epoch(ax, epoch: int, value: float | None, colour: str) -> None:
    ax.axvline(epoch, color=colour, linestyle=":", linewidth=1, gid="published")
    if value is not None:
        ax.plot([epoch], [value], "o", markersize=11, markerfacecolor="none", markeredgecolor=colour,
                markeredgewidth=1.5, gid="published")


def sweep_figure(panels: dict[str, dict[str, list[tuple[float, float, float, list[float]]]]], path: str | Path) -> Path:
    """AUC against label fraction (log x axis): one panel per test set, one line per method,
    error bars +-1 sd over seeds and every seed's AUC as a faint dot.
    ``panels``: test set title -> method -> [(fraction, mean, sd, per-seed AUCs)] by fraction."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False, sharey=True)
    for ax, (title, methods) in zip(axes[0], panels.items(), strict=True):
        fractions = sorted({p[0] for points in methods.values() for p in points})
        for i, (method, points) in enumerate(methods.items()):
            dodge = 1 + 0.025 * (i - (len(methods) - 1) / 2)  # methods side by side at each fraction
            x = [p[0] * dodge for p in points]
            ax.errorbar(x, [p[1] for p in points], yerr=[p[2] for p in points], marker="o", capsize=3,
                        color=f"C{i}", label=method)
            for (fraction, _, _, aucs) in points:
                ax.scatter([fraction * dodge] * len(aucs), aucs, s=8, alpha=0.35, color=f"C{i}")
        ax.set(xscale="log", xlabel="labeled fraction of the train split", title=title)
        ax.set_xticks(fractions, [f"{100 * f:.3g}%" for f in fractions])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    axes[0][0].set_ylabel("test AUC (mean +- sd over seeds)")
    axes[0][0].legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path
