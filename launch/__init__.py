"""Launchers: local ranks (torchrun elastic agent), SLURM (submitit), Ray Train; cluster/ holds the development clusters."""
