"""Data pipeline: tokenizers, Megatron-format indexed datasets, preprocessing, GPT samples.

Modules: ``tokenizer`` (``build_tokenizer``, ``train_sentencepiece``), ``indexed_dataset``
(``IndexedDatasetBuilder``, ``IndexedDataset``), ``preprocess`` (``preprocess``) and
``gpt_dataset`` (``GPTDataset``).
"""
