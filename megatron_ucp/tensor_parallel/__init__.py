"""Megatron-style tensor parallelism: conjugate communication pairs, parallel layers, vocab-parallel loss."""
