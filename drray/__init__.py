"""drray: semi-supervised diabetic-retinopathy screening (SimCLR -> teacher -> pseudo-labels ->
student) as Ray jobs that run on a laptop CPU and on SLURM clusters of GPU nodes."""

__version__ = "0.1.0"
