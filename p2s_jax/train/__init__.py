"""Fine-tuning: config, samplers, losses, the correction loop, optimiser, step, loop, checkpoints."""
