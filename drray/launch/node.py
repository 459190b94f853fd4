"""``python -m drray.launch.node [--folder DIR] -- COMMAND ...``: run as one task per node of a
SLURM allocation (``srun --ntasks-per-node=1``), it forms the Ray cluster over the allocation
(drray.launch.ray_cluster) and runs COMMAND on the first node with RAY_ADDRESS set; the other
nodes serve as Ray workers until it ends. Exits with COMMAND's status. For sbatch scripts that
want Ray on SLURM without submitit (slurm/ray-on-slurm.sbatch).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from drray.launch.ray_cluster import NodeTask, ray_on_allocation


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m drray.launch.node", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, default=None,
                        help="shared directory where the nodes meet (default: ./ray-<job id>)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for every node to join")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command for the first node")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --, e.g. -- drray run pipeline --config configs/ci.yaml")
    if "SLURM_JOB_ID" not in os.environ:
        parser.error("not inside a SLURM job: run this with srun --ntasks-per-node=1 in an allocation")
    task = NodeTask.from_slurm()
    folder = args.folder or Path(f"ray-{task.job_id}")
    with ray_on_allocation(folder.resolve(), task, timeout_s=args.timeout) as address:
        if address is None:
            return 0
        return subprocess.run(command).returncode


if __name__ == "__main__":
    sys.exit(main())
