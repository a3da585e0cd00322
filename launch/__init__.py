"""Launchers: local, SLURM, Ray (built in later issues)."""
