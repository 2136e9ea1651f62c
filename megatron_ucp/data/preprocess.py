"""Turn a text corpus into Megatron ``.bin``/``.idx`` token datasets.

Input: one file, or a folder whose ``.txt``/``.txt.xz``/``.jsonl``/``.json`` files (and xz-compressed
JSON lines) are read in sorted name order, not recursively; links in it are refused.
Formats (chosen by file name):

* ``.txt`` / ``.txt.xz`` -- one document per *paragraph*: text separated by one or more
  blank (empty or whitespace-only) lines.  Each paragraph is stripped of surrounding
  whitespace and otherwise kept verbatim, hard line breaks included.
* ``.jsonl`` / ``.json`` -- one JSON object per line (Megatron's ``--input`` convention);
  each key in ``json_keys`` is a separate output dataset.  Values are kept verbatim.

A document that is empty after ``strip()`` is skipped.  With ``append_eod`` the
tokenizer's EOD id follows every document.  Output for key ``k`` goes to
``{output_prefix}_{k}_document.bin/.idx`` (so ``_text_document`` for text), written via
temporary names and renamed into place only when complete.  Next to it,
``{output_prefix}_{k}_document.tokenizer.json`` records which tokenizer wrote it (type, sha256 of
its files, vocab_size, eod), also written atomically.

On a terminal a progress bar shows documents and tokens per second; off one it is silent.
"""

from __future__ import annotations

import itertools
import json
import lzma
import multiprocessing
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_ucp.atomic import atomic_write
from megatron_ucp.progress import is_terminal
from megatron_ucp.data.indexed_dataset import (
    IndexedDatasetBuilder,
    best_dtype,
    data_file_path,
    index_file_path,
)
from megatron_ucp.data.tokenizer import Tokenizer, build_tokenizer, read_text

__all__ = [
    "INPUT_SUFFIXES",
    "PreprocessReport",
    "input_files",
    "iter_documents",
    "output_prefix_for",
    "preprocess",
    "sidecar_path",
    "split_paragraphs",
    "tokenizer_record",
]

# What a folder given as --input contributes (a file given by name may be any of these too).
INPUT_SUFFIXES = (".txt", ".txt.xz", ".jsonl", ".json", ".jsonl.xz", ".json.xz")

_BLANK_LINES = re.compile(r"\n(?:[ \t\f\v]*\n)+")


@dataclass
class PreprocessReport:
    documents: int  # documents written, summed over keys
    tokens: int  # tokens written, EODs included, summed over keys
    seconds: float
    skipped: int = 0  # empty documents left out
    outputs: dict[str, str] = field(default_factory=dict)  # json key -> dataset prefix


def split_paragraphs(text: str) -> list[str]:
    """Documents of a plain-text corpus: stripped paragraphs, empty ones dropped."""
    return [p.strip() for p in _BLANK_LINES.split(text) if p.strip()]


def _is_jsonl(path: Path) -> bool:
    return path.name.endswith((".jsonl", ".json", ".jsonl.xz", ".json.xz"))


def input_files(input_path: str | os.PathLike) -> list[Path]:
    """The files ``input_path`` names: itself, or a folder's input files in sorted order.

    A folder's links are refused (``ValueError`` naming the link), as is a folder with no input file.
    """
    path = Path(input_path)
    if not path.is_dir():
        if not path.is_file():
            raise FileNotFoundError(f"{path}: input not found")
        return [path]
    files = []
    for entry in sorted(path.iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(INPUT_SUFFIXES):
            continue
        if entry.is_symlink():
            raise ValueError(f"{entry}: is a symbolic link; input folders must hold regular files")
        if entry.is_file():
            files.append(entry)
    if not files:
        raise ValueError(f"{path}: no input files in the folder (looked for {', '.join(INPUT_SUFFIXES)})")
    return files


def iter_documents(input_path: str | os.PathLike, json_keys: Sequence[str] = ("text",)) -> Iterator[dict[str, str]]:
    """Yield ``{key: text}`` per document, in input order (empty documents included).

    ``input_path`` may be a folder (see :func:`input_files`); its files follow each other."""
    for path in input_files(input_path):
        yield from _file_documents(path, json_keys)


def _file_documents(path: Path, json_keys: Sequence[str]) -> Iterator[dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: input not found")
    if not _is_jsonl(path):
        if list(json_keys) != ["text"]:
            raise ValueError(f"{path}: plain-text input has only the key 'text', not {list(json_keys)}")
        for paragraph in split_paragraphs(read_text(path)):
            yield {"text": paragraph}
        return
    opener = lzma.open if path.name.endswith(".xz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            missing = [k for k in json_keys if k not in obj]
            if missing:
                raise ValueError(f"{path}:{lineno}: missing key(s) {missing}")
            doc = {k: obj[k] for k in json_keys}
            bad = [k for k, v in doc.items() if not isinstance(v, str)]
            if bad:
                raise ValueError(f"{path}:{lineno}: value of key(s) {bad} is not a string")
            yield doc


def sidecar_path(prefix: str | os.PathLike) -> str:
    """Where the tokenizer record of dataset ``prefix`` goes: ``{prefix}.tokenizer.json``."""
    return f"{prefix}.tokenizer.json"


def tokenizer_record(tokenizer: Tokenizer) -> dict[str, Any]:
    """What a dataset's sidecar says about the tokenizer that wrote it."""
    return {**tokenizer.identity, "vocab_size": int(tokenizer.vocab_size), "eod": int(tokenizer.eod)}


def output_prefix_for(output_prefix: str | os.PathLike, key: str) -> str:
    """Megatron's naming: ``{output_prefix}_{key}_document``."""
    return f"{output_prefix}_{key}_document"


# Worker state: each pool process builds its own tokenizer once (SentencePiece objects
# cannot be pickled, and rebuilding per document would dominate the run time).
_worker_tokenizer: Tokenizer | None = None
_worker_append_eod = False


def _init_worker(tokenizer_kwargs: dict, append_eod: bool) -> None:
    global _worker_tokenizer, _worker_append_eod
    _worker_tokenizer = build_tokenizer(**tokenizer_kwargs)
    _worker_append_eod = append_eod


def _encode(doc: dict[str, str]) -> dict[str, list[int]]:
    assert _worker_tokenizer is not None
    out: dict[str, list[int]] = {}
    for key, text in doc.items():
        if not text.strip():
            out[key] = []  # skipped by the writer
            continue
        ids = _worker_tokenizer.tokenize(text)
        if _worker_append_eod:
            ids.append(_worker_tokenizer.eod)
        out[key] = ids
    return out


def _document_bar(enabled: bool) -> Any:
    """A ``tqdm`` bar counting documents on stderr, or ``None`` off a terminal."""
    if not (enabled and is_terminal(sys.stderr)):
        return None
    from tqdm import tqdm

    return tqdm(desc="tokenizing", unit=" docs", file=sys.stderr, mininterval=0.5, dynamic_ncols=True)


def _advance(bar: Any, tokens: int, start: float) -> None:
    bar.update(1)
    if bar.n % 256 == 0:  # the postfix redraws; keep it cheap
        elapsed = time.perf_counter() - start
        bar.set_postfix_str(f"{tokens / elapsed if elapsed > 0 else 0:,.0f} tokens/s", refresh=False)


_CHUNK = 64  # documents per task sent to a worker: amortizes the IPC cost of small paragraphs
_WINDOW_CHUNKS = 16  # chunks per worker read ahead of what has been written


def _in_windows(pool: Any, documents: Iterator[dict[str, str]], workers: int) -> Iterator[dict[str, list[int]]]:
    """``pool.imap(_encode, documents)`` in input order, reading the input a window at a time.

    ``Pool.imap`` alone hands the whole input to a feeder thread, which reads it as fast as it can: a
    200 MB jsonl would sit in memory as pending tasks. Here at most ``workers * _WINDOW_CHUNKS`` chunks
    are read ahead of the writer, so memory stays bounded by the window, not the corpus."""
    window = workers * _WINDOW_CHUNKS * _CHUNK
    while True:
        batch = list(itertools.islice(documents, window))
        if not batch:
            return
        yield from pool.imap(_encode, batch, chunksize=_CHUNK)


def preprocess(
    input_path: str | os.PathLike,
    output_prefix: str | os.PathLike,
    tokenizer_type: str,
    *,
    tokenizer_model: str | os.PathLike | None = None,
    vocab_file: str | os.PathLike | None = None,
    merge_file: str | os.PathLike | None = None,
    json_keys: Sequence[str] = ("text",),
    append_eod: bool = False,
    workers: int = 1,
    log_interval: int = 0,
    progress: bool = True,
) -> PreprocessReport:
    """Tokenize ``input_path`` into one indexed dataset per key; see the module docstring.

    ``workers > 1`` tokenizes in a process pool; the output is identical to ``workers=1``
    (documents keep input order).  ``log_interval > 0`` prints progress to stderr every
    that many documents.  ``progress`` draws a bar (documents, tokens/s) when stderr is a
    terminal, instead of those lines.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    start = time.perf_counter()
    tokenizer_kwargs: dict[str, Any] = dict(
        tokenizer_type=tokenizer_type,
        tokenizer_model=tokenizer_model,
        vocab_file=vocab_file,
        merge_file=merge_file,
    )
    tokenizer = build_tokenizer(**tokenizer_kwargs)  # fail fast, and for vocab_size
    dtype = best_dtype(tokenizer.vocab_size)
    input_files(input_path)  # fail fast on a missing input or a bad folder
    documents = iter_documents(input_path, json_keys)

    prefixes = {k: output_prefix_for(output_prefix, k) for k in json_keys}
    builders = {k: IndexedDatasetBuilder(data_file_path(p), dtype) for k, p in prefixes.items()}
    written = dict.fromkeys(json_keys, 0)
    skipped = tokens = seen = 0
    pool = None
    encoded: Iterator[dict[str, list[int]]]
    bar = _document_bar(progress)
    try:
        if workers == 1:
            _init_worker(tokenizer_kwargs, append_eod)
            encoded = map(_encode, documents)
        else:
            pool = multiprocessing.Pool(workers, _init_worker, (tokenizer_kwargs, append_eod))
            encoded = _in_windows(pool, documents, workers)
        for doc in encoded:
            seen += 1
            for key, ids in doc.items():
                if not ids:
                    skipped += 1
                    continue
                builders[key].add_document(ids)
                written[key] += 1
                tokens += len(ids)
            if bar is not None:
                _advance(bar, tokens, start)
            elif log_interval > 0 and seen % log_interval == 0:
                elapsed = time.perf_counter() - start
                print(f"processed {seen} documents, {tokens} tokens, {elapsed:.1f} s", file=sys.stderr)
        for key, builder in builders.items():
            builder.finalize(index_file_path(prefixes[key]))
            record = json.dumps(tokenizer_record(tokenizer), indent=2, sort_keys=True) + "\n"
            atomic_write(sidecar_path(prefixes[key]), record)
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.terminate()
        for builder in builders.values():
            builder.abort()  # deletes temporaries unless finalized

    return PreprocessReport(
        documents=sum(written.values()),
        tokens=tokens,
        seconds=time.perf_counter() - start,
        skipped=skipped,
        outputs=prefixes,
    )
