"""The DeepSpeed trainer: typed run config, engine, the Trainer loop, checkpoints, logging (see README, Training)."""
