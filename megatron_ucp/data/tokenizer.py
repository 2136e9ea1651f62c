"""Tokenizers for the data pipeline, behind one small interface.

``build_tokenizer(kind, ...)`` returns an object with

* ``name``            -- the tokenizer type string it was built from,
* ``vocab_size``      -- the *unpadded* vocabulary size (the model pads it for TP),
* ``eod``             -- the token id appended after each document,
* ``tokenize(text)``  -- ``str -> list[int]``,
* ``detokenize(ids)`` -- ``list[int] -> str``,
* ``identity``        -- ``{"type": name, "sha256": hex}``: a hash of the files that define it
  (see :func:`files_sha256`), so a dataset can record which tokenizer wrote it.

Three kinds exist:

``SentencePieceTokenizer``
    Wraps ``sentencepiece.SentencePieceProcessor``; ``eod`` is the model's eos id.  The
    project's own model (``data/tokenizer/austen-bpe-8k.model``) is trained by
    :func:`train_sentencepiece` to be lossless: ``detokenize(tokenize(s)) == s`` for any ``s``.
``GPT2BPETokenizer``
    GPT-2's byte-level BPE read from ``vocab.json`` + ``merges.txt``, implemented here in
    plain Python; ``eod`` is the id of ``<|endoftext|>``.  That string inside the *text* is
    encoded as ordinary characters (as Megatron's GPT-2 tokenizer does); EOD only comes
    from ``eod``.
``HFTokenizer``
    A local Hugging Face tokenizer folder (``tokenizer.json``, ``tokenizer_config.json``, ...)
    loaded with ``transformers.AutoTokenizer`` from local files only, without remote code.
    ``tokenize`` gives exactly ``AutoTokenizer.from_pretrained(folder)(text)["input_ids"]``
    (so a BOS comes first where the folder's config says so); ``eod`` is its EOS id and
    ``vocab_size`` is ``len(tokenizer)``, added tokens included.
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import os
import stat
import unicodedata
from collections.abc import Iterable, Sequence
from functools import cache, lru_cache
from pathlib import Path
from typing import Protocol
from megatron_ucp.atomic import atomic_write

__all__ = [
    "Tokenizer",
    "SentencePieceTokenizer",
    "GPT2BPETokenizer",
    "HFTokenizer",
    "HF_TOKENIZER_FILES",
    "hf_tokenizer_files",
    "files_sha256",
    "SUPPORTED_TOKENIZERS",
    "build_tokenizer",
    "bytes_to_unicode",
    "gpt2_pretokenize_pattern",
    "read_text",
    "train_sentencepiece",
    "train_byte_level_bpe",
]

SUPPORTED_TOKENIZERS = ("SentencePieceTokenizer", "GPT2BPETokenizer", "HFTokenizer")
# The files of a Hugging Face tokenizer folder that define its behaviour (hashed for its identity).
HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
GPT2_EOD = "<|endoftext|>"
_NO_RANK = float("inf")


class Tokenizer(Protocol):
    """What the rest of the project may rely on."""

    name: str
    vocab_size: int
    eod: int

    def tokenize(self, text: str) -> list[int]: ...

    def detokenize(self, ids: Sequence[int]) -> str: ...

    @property
    def identity(self) -> dict[str, str]: ...


def hf_tokenizer_files(folder: str | os.PathLike) -> list[tuple[str, Path]]:
    """(name, path) of each ``HF_TOKENIZER_FILES`` entry in ``folder`` (links included, for ``files_sha256``
    to refuse): the files a Hugging Face tokenizer's identity is the hash of."""
    path = Path(folder)
    return [(n, path / n) for n in HF_TOKENIZER_FILES if (path / n).is_symlink() or (path / n).exists()]


def files_sha256(files: Sequence[tuple[str, str | os.PathLike]]) -> str:
    """One sha256 over ``(label, path)`` pairs: each label, size and content, in the given order.

    A link, or anything that is not a regular file, is refused with ``ValueError`` naming it:
    the hash must describe the bytes the tokenizer was read from, not wherever a link points.
    """
    digest = hashlib.sha256()
    for label, path in files:
        p = Path(path)
        if p.is_symlink():
            raise ValueError(f"{p}: is a symbolic link; tokenizer files must be regular files")
        # O_NOFOLLOW: a link swapped in after the check is not read either; O_NONBLOCK: nor does a fifo block.
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ValueError(f"{p}: not a regular file")
            data = f.read()
        digest.update(f"{label}\0{len(data)}\0".encode("utf-8"))
        digest.update(data)
    return digest.hexdigest()


def _require_file(path: str | os.PathLike | None, what: str) -> Path:
    if path is None:
        raise ValueError(f"{what} is required")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: {what} not found")
    return p


def build_tokenizer(
    tokenizer_type: str,
    *,
    tokenizer_model: str | os.PathLike | None = None,
    vocab_file: str | os.PathLike | None = None,
    merge_file: str | os.PathLike | None = None,
) -> Tokenizer:
    """Build a tokenizer by Megatron type name.

    Raises ``ValueError`` for an unknown type or a missing required argument and
    ``FileNotFoundError`` (naming the file) when a given file does not exist.
    """
    if tokenizer_type == "SentencePieceTokenizer":
        return SentencePieceTokenizer(_require_file(tokenizer_model, "--tokenizer-model"))
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(_require_file(vocab_file, "--vocab-file"), _require_file(merge_file, "--merge-file"))
    if tokenizer_type == "HFTokenizer":
        if tokenizer_model is None:
            raise ValueError("--tokenizer-model (a Hugging Face tokenizer folder) is required")
        return HFTokenizer(tokenizer_model)
    raise ValueError(f"unknown tokenizer type {tokenizer_type!r}; supported: {', '.join(SUPPORTED_TOKENIZERS)}")


# --------------------------------------------------------------------------- SentencePiece


class SentencePieceTokenizer:
    """A SentencePiece model; ``eod`` is its eos id (the model must define one)."""

    name = "SentencePieceTokenizer"

    def __init__(self, model_file: str | os.PathLike) -> None:
        import sentencepiece as spm  # imported lazily: GPT-2 users do not need it

        self.model_file = str(_require_file(model_file, "SentencePiece model"))
        try:
            self._sp = spm.SentencePieceProcessor(model_file=self.model_file)
        except (OSError, RuntimeError) as e:  # RuntimeError("could not parse ModelProto ...")
            raise ValueError(f"{self.model_file}: not a SentencePiece model ({e})") from None
        self.vocab_size = int(self._sp.get_piece_size())
        self.eod = int(self._sp.eos_id())
        if self.eod < 0:
            raise ValueError(f"{self.model_file}: SentencePiece model has no eos piece (eos_id=-1)")

    @property
    def identity(self) -> dict[str, str]:
        return {"type": self.name, "sha256": files_sha256([("tokenizer.model", self.model_file)])}

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def __getstate__(self) -> dict:  # SentencePieceProcessor is not picklable; reload by path
        return {"model_file": self.model_file}

    def __setstate__(self, state: dict) -> None:
        type(self).__init__(self, state["model_file"])


def read_text(path: str | os.PathLike) -> str:
    """Read a UTF-8 ``.txt`` or xz-compressed ``.txt.xz`` file (universal newlines)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: input not found")
    opener = lzma.open if p.name.endswith(".xz") else open
    with opener(p, "rt", encoding="utf-8") as f:
        return f.read()


def train_sentencepiece(
    text_path: str | os.PathLike,
    model_prefix: str | os.PathLike,
    vocab_size: int = 8000,
    *,
    seed: int = 1234,
) -> Path:
    """Train a SentencePiece BPE model on a ``.txt``/``.txt.xz`` corpus; return the ``.model`` path.

    Writes ``{model_prefix}.model`` and a human-readable ``{model_prefix}.vocab``
    (``piece<TAB>score`` per line), each via a temporary name and ``os.replace``.

    The model is *lossless* and *reproducible*:

    * ``identity`` normalization, no whitespace squeezing, and byte fallback mean every
      string round-trips exactly (newlines, which never occur inside a training line,
      become the byte piece ``<0x0A>``);
    * a fixed thread count, the whole corpus (no sampling/shuffling), a fixed seed, and
      training from an iterator into memory (so no file path is recorded in the model)
      make two runs on the same text byte-identical.

    Each non-blank line of the corpus is one training sentence; hard-wrapped lines are fine
    because BPE pieces never cross whitespace anyway.
    """
    import sentencepiece as spm

    lines = [line for line in read_text(text_path).split("\n") if line.strip()]
    if not lines:
        raise ValueError(f"{text_path}: no text to train on")
    spm.set_random_generator_seed(seed)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,  # the EOD token of SentencePieceTokenizer
        pad_id=-1,
        # The thread count is recorded in the model file, so fix it for byte-identical output
        # (the learned pieces were the same with 1, 2 and 16 threads in a check).
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    model_bytes = buf.getvalue()

    model_path = Path(f"{model_prefix}.model")
    model_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(model_path, model_bytes)
    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    vocab_lines = (f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size()))
    atomic_write(Path(f"{model_prefix}.vocab"), "".join(vocab_lines).encode("utf-8"))
    return model_path


# --------------------------------------------------------------------------- GPT-2 BPE


@cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes map to themselves; the other 68 (controls, space, soft hyphen,
    ...) map to U+0100 onwards in byte order, so BPE never has to handle whitespace or
    control characters and every byte string has a unique visible spelling.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# GPT-2's pre-tokenizer: contractions, optional-space + letters / digits / other symbols,
# then whitespace (a whitespace run before a word leaves its last space to that word).
# {L}, {N}, {S} are character-class bodies: letters, numbers, whitespace.
_GPT2_TEMPLATE = r"""'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^{S}{L}{N}]+|[{S}]+(?![^{S}])|[{S}]+"""

# The Unicode White_Space property, which is what `regex`'s \s matches.  Python's `re` \s
# follows str.isspace() and also accepts U+001C..U+001F, so the class is spelled out.
_WHITE_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


def _category_class(prefix: str) -> str:
    """A ``re`` class body matching every code point whose general category starts with ``prefix``."""
    ranges: list[list[int]] = []
    for cp in range(0x110000):
        if unicodedata.category(chr(cp)).startswith(prefix):
            if ranges and ranges[-1][1] == cp - 1:
                ranges[-1][1] = cp
            else:
                ranges.append([cp, cp])
    return "".join(f"\\U{a:08x}-\\U{b:08x}" for a, b in ranges)


@lru_cache(maxsize=2)
def gpt2_pretokenize_pattern(use_regex: bool | None = None):
    """The compiled GPT-2 pre-tokenization pattern.

    With the third-party ``regex`` module (``use_regex=None``: use it when installed) this is
    GPT-2's pattern with ``\\p{L}``, ``\\p{N}`` and ``\\s``.  Without it, the stdlib ``re``
    gets the same pattern with explicit classes generated from ``unicodedata`` (letters =
    categories L*, numbers = N*, whitespace = the White_Space property).  The two agree
    except where Python's ``unicodedata`` and ``regex`` know different Unicode versions
    (newly assigned code points only).  Building the ``re`` classes takes ~0.5 s, once.
    """
    if use_regex is None:
        try:
            import regex  # noqa: F401
        except ImportError:
            use_regex = False
        else:
            use_regex = True
    if use_regex:
        import regex

        return regex.compile(_GPT2_TEMPLATE.format(L=r"\p{L}", N=r"\p{N}", S=r"\s"))
    import re

    return re.compile(_GPT2_TEMPLATE.format(L=_category_class("L"), N=_category_class("N"), S=_WHITE_SPACE))


class GPT2BPETokenizer:
    """GPT-2 byte-level BPE from ``vocab.json`` (token -> id) and ``merges.txt`` (ranked pairs).

    Encoding: split the text with GPT-2's pre-tokenizer regex, map each piece's UTF-8 bytes
    through :func:`bytes_to_unicode`, then repeatedly merge the adjacent pair with the lowest
    merge rank until no ranked pair remains; look the resulting symbols up in the vocab.
    Results per piece are cached because natural text repeats words a lot.
    """

    name = "GPT2BPETokenizer"

    def __init__(
        self,
        vocab_file: str | os.PathLike,
        merge_file: str | os.PathLike,
        *,
        use_regex: bool | None = None,
    ) -> None:
        self.vocab_file = str(_require_file(vocab_file, "GPT-2 vocab file"))
        self.merge_file = str(_require_file(merge_file, "GPT-2 merges file"))
        self._use_regex = use_regex
        with open(self.vocab_file, encoding="utf-8") as f:
            self.encoder: dict[str, int] = json.load(f)
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(self._read_merges(self.merge_file))}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self._pattern = gpt2_pretokenize_pattern(use_regex)
        self._cache: dict[str, tuple[str, ...]] = {}
        if GPT2_EOD not in self.encoder:
            raise ValueError(f"{self.vocab_file}: no {GPT2_EOD!r} token")
        self.eod = self.encoder[GPT2_EOD]
        # Unpadded size: ids are 0..max, which equals len(encoder) for a well-formed vocab.
        self.vocab_size = max(self.encoder.values()) + 1

    @staticmethod
    def _read_merges(path: str) -> list[tuple[str, str]]:
        merges = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.rstrip("\n")
                if not line or (lineno == 1 and line.startswith("#version")):
                    continue
                parts = line.split(" ")
                if len(parts) != 2:
                    raise ValueError(f"{path}:{lineno}: expected 'left right', got {line!r}")
                merges.append((parts[0], parts[1]))
        return merges

    def _bpe(self, piece: str) -> tuple[str, ...]:
        cached = self._cache.get(piece)
        if cached is not None:
            return cached
        symbols = list(piece)
        while len(symbols) > 1:
            # Merge the adjacent pair with the lowest rank, everywhere it occurs (left to right).
            best = min(zip(symbols, symbols[1:], strict=False), key=lambda pair: self.bpe_ranks.get(pair, _NO_RANK))
            if best not in self.bpe_ranks:
                break
            first, second = best
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        result = tuple(symbols)
        if len(self._cache) < 100_000:  # bound memory on adversarial input
            self._cache[piece] = result
        return result

    @property
    def identity(self) -> dict[str, str]:
        files = [("vocab.json", self.vocab_file), ("merges.txt", self.merge_file)]
        return {"type": self.name, "sha256": files_sha256(files)}

    def tokenize(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self._pattern.findall(text):
            mapped = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            try:
                ids.extend(self.encoder[s] for s in self._bpe(mapped))
            except KeyError as e:
                raise ValueError(f"{self.vocab_file}: BPE produced {e.args[0]!r}, not in the vocab") from None
        return ids

    def detokenize(self, ids: Iterable[int]) -> str:
        chars = "".join(self.decoder[int(i)] for i in ids)
        # Like GPT-2, replace byte sequences that are not valid UTF-8 (a cut multi-byte char).
        return bytes(self.byte_decoder[c] for c in chars).decode("utf-8", errors="replace")

    def __getstate__(self) -> dict:  # a compiled `regex` pattern may not pickle; rebuild
        return {"vocab_file": self.vocab_file, "merge_file": self.merge_file, "use_regex": self._use_regex}

    def __setstate__(self, state: dict) -> None:
        type(self).__init__(self, state["vocab_file"], state["merge_file"], use_regex=state["use_regex"])


# --------------------------------------------------------------------------- Hugging Face


class HFTokenizer:
    """A local Hugging Face tokenizer folder, through ``transformers.AutoTokenizer``.

    Only local files are read (``local_files_only``, and ``HF_HUB_OFFLINE=1`` is set in this
    process) and no code from the folder runs (``trust_remote_code=False``).  The folder must
    define an EOS token, which becomes ``eod``.
    """

    name = "HFTokenizer"

    def __init__(self, folder: str | os.PathLike) -> None:
        path = Path(folder)
        if path.is_symlink():
            raise ValueError(f"{path}: is a symbolic link; give the tokenizer folder itself")
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: Hugging Face tokenizer folder not found")
        self.folder = str(path)
        present = hf_tokenizer_files(path)
        if not present:
            raise ValueError(f"{path}: no tokenizer files (expected one of {', '.join(HF_TOKENIZER_FILES)})")
        self._sha256 = files_sha256(present)  # also refuses links before anything reads them
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we parallelize with processes
        from transformers import AutoTokenizer  # imported lazily: it is slow and optional

        try:
            self._tok = AutoTokenizer.from_pretrained(self.folder, local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
            raise ValueError(f"{path}: not a loadable Hugging Face tokenizer ({' '.join(str(e).split())})") from None
        eos = self._tok.eos_token_id
        if eos is None:
            raise ValueError(f"{path}: the tokenizer defines no EOS token, which is needed as the end-of-document id")
        self.eod = int(eos)
        self.vocab_size = len(self._tok)

    @property
    def identity(self) -> dict[str, str]:
        return {"type": self.name, "sha256": self._sha256}

    def tokenize(self, text: str) -> list[int]:
        return list(self._tok(text, verbose=False)["input_ids"])

    def detokenize(self, ids: Sequence[int]) -> str:
        text = self._tok.decode([int(i) for i in ids])
        assert isinstance(text, str)  # one sequence in, one string out
        return text

    def __getstate__(self) -> dict:  # reload from the folder in the receiving process
        return {"folder": self.folder}

    def __setstate__(self, state: dict) -> None:
        type(self).__init__(self, state["folder"])


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int, output_dir: str | os.PathLike, *,
                         bos_token: str = "<s>", eos_token: str = "</s>", prepend_bos: bool = False,
                         added_tokens: Sequence[str] = (), show_progress: bool = False):
    """Train a byte-level BPE (GPT-2 / Llama 3 style) on ``texts`` with the ``tokenizers`` library and save
    it as a Hugging Face tokenizer folder in ``output_dir``, as a Hub download would have it.

    ``vocab_size`` counts the special tokens (``bos_token`` and ``eos_token``, ids 0 and 1, one id when
    they are the same string); ``prepend_bos``: the tokenizer's post-processor puts BOS before every
    sequence (as Llama 3's does); ``added_tokens``: further tokens after the trained ones, part of
    ``len(tokenizer)``. Returns the ``PreTrainedTokenizerFast`` it saved (its ``backend_tokenizer.model``
    is the BPE, for GPT-2's ``vocab.json``/``merges.txt``)."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(dict.fromkeys([bos_token, eos_token]))
    bpe = RustTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    if prepend_bos:
        bpe.post_processor = processors.TemplateProcessing(single=f"{bos_token} $A",
                                                           special_tokens=[(bos_token, specials.index(bos_token))])
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=bos_token, eos_token=eos_token)
    if added_tokens:
        fast.add_tokens(list(added_tokens))
    fast.save_pretrained(str(output_dir))
    return fast
