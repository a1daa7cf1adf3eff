"""What every command runs on: the process group, the DeepSpeed engine and its JSON, Slurm's
environment, and atomic files."""
