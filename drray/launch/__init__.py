"""Launching drray jobs on SLURM: Ray over an allocation (ray_cluster), submission and job
records through submitit (slurm), cluster profiles (profiles), a node entry point for plain
sbatch scripts (node). Imports drray.distributed, never jobs: a job function is passed in."""
