"""Development clusters on this machine: a local S3 server (``python -m launch.cluster.local_s3``),
a Ray head (``ray_up.sh``) and a 2-node SLURM cluster (``slurm_up.sh``). Tests, benchmarks and
local runs use them; the runtime packages (data_pipeline, model_zoo, trainer) never import them."""
