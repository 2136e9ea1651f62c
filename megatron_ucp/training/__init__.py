"""Training on DeepSpeed: arguments, LR schedule, data feeding, logging, checkpoints, the loop."""
