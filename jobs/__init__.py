"""The suite of cluster jobs: each module reads its config, calls drray, writes artifacts.

Every job is a function ``run(cfg) -> dict`` importable by reference, so that submitit can
pickle it for SLURM and ``drray run JOB`` can call it locally. Job modules never import each
other; they share ``stages`` (the stage graph: names, keys, directories), ``runner`` (running
steps in order) and ``common`` (prepared data, labeled subset, fit plans, completion).
"""
