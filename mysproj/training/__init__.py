"""Fine-tuning: data order and batches, what trains per strategy, the accelerate/DeepSpeed loop, checkpoints."""
