"""tpembed training: entry scripts, the one training loop, config and checkpoints."""
