"""Command-line entry points (``launch``, ``scaleforge``) and job submission (local, multi-node, Slurm)."""
