"""megatron_ucp: a compact Megatron-style GPT trainer on DeepSpeed, built around universal checkpoints.

Importing the package has no side effects; see README.md for the entry points.
"""

__version__ = "0.1.0"
