"""Reading DeepSpeed ZeRO checkpoints and writing DeepSpeed's universal checkpoint format."""
