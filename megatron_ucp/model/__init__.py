"""The GPT model: architecture (gpt.py), its DeepSpeed pipeline form (pipe.py), initialisation (init.py)."""
