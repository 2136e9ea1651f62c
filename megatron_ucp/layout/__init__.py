"""The single source of truth for parallel layout and parameter rules.

Everything in this package is pure: it imports the standard library and torch tensors only,
never ``torch.distributed``, DeepSpeed or argparse. The model, the trainer, the checkpoint code
and every tool derive names, slicing, initialisation and universal-checkpoint patterns from it.
"""
