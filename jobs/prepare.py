"""``drray run prepare``: every data set a config names, prepared (Parquet shards).

It synthesises the embedded synthetic data where the config asks for it and the images are
missing, prepares what is not prepared yet (or was prepared with other parameters), and leaves
the rest as it is (``drray.distributed.prepare.ensure_prepared``).
"""

from __future__ import annotations

from drray.artifacts import atomic_write_json, write_resolved_config
from drray.config import Config, run_dir
from drray.distributed.prepare import ensure_prepared


def run(cfg: Config) -> dict:
    """Prepare every data set the config names; write a summary into the run directory
    (``datasets``: per data set, its counts and whether a current set was reused)."""
    out = run_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    write_resolved_config(out, cfg)
    datasets = {"eyepacs": cfg.data.eyepacs}
    if cfg.data.external is not None:
        datasets["external"] = cfg.data.external
    manifests = {name: ensure_prepared(name, ds, cfg) for name, ds in datasets.items()}
    summary = {name: {"prepared_dir": datasets[name].prepared, "reused": m.get("reused", False), **m["counts"]}
               for name, m in manifests.items()}
    atomic_write_json(out / "data.json", summary)
    return {"stage": "prepare", "datasets": summary, "skipped": all(d["reused"] for d in summary.values())}


def format_summary(manifest_counts: dict, where: str) -> str:
    c = manifest_counts
    lines = [
        f"{where}: {c['prepared']} of {c['inputs']} inputs prepared "
        f"({c['labeled']} labeled, {c['unlabeled']} unlabeled), {c['rejected']} rejected",
        f"  splits: {', '.join(f'{k} {v}' for k, v in c['by_split'].items()) or 'none'}",
        f"  grades: {', '.join(f'{k}: {v}' for k, v in c['by_grade'].items()) or 'none'}",
    ]
    if c["rejected_by_reason"]:
        lines.append("  rejected: " + ", ".join(f"{k} {v}" for k, v in c["rejected_by_reason"].items())
                     + f" (reasons per file in {where}/rejects.parquet)")
    return "\n".join(lines)
