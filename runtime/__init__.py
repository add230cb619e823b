"""runtime: executes a Plan with DeepSpeed (models, hooks, losses, stages, checkpoints)."""
