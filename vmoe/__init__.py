"""Vision Mixture-of-Experts: ViT, V-MoE, expert-choice and Soft MoE in JAX/Flax NNX."""
