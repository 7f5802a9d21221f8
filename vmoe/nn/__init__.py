"""Neural network modules (Flax NNX)."""
