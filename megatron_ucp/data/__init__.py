"""Data pipeline: tokenizers, Megatron-format indexed datasets, preprocessing, GPT samples.

Modules: ``tokenizer`` (``build_tokenizer``: SentencePiece, GPT-2 BPE or a local Hugging Face
folder; ``train_sentencepiece``), ``indexed_dataset``
(``IndexedDatasetBuilder``, ``IndexedDataset``), ``preprocess`` (``preprocess``, which also writes each
dataset's ``.tokenizer.json`` record) and
``gpt_dataset`` (``GPTDataset``).
"""
