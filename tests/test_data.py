"""Tests of the data pipeline: tokenizers, indexed datasets, preprocessing, GPT samples."""

from __future__ import annotations

import json
import lzma
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from helpers import CORPUS, REPO, SP_MODEL, load_tool
from megatron_ucp.data.gpt_dataset import GPTDataset, split_ranges
from megatron_ucp.data.indexed_dataset import (
    IndexedDataset,
    IndexedDatasetBuilder,
    best_dtype,
)
from megatron_ucp.data.tokenizer import (
    GPT2BPETokenizer,
    build_tokenizer,
    bytes_to_unicode,
)

GPT2_DIR = REPO / "tests/fixtures/gpt2_tiny"
GPT2_FILES = dict(vocab_file=GPT2_DIR / "vocab.json", merge_file=GPT2_DIR / "merges.txt")


def write_dataset(prefix: Path, docs: list[list[int]], dtype=np.uint16) -> None:
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype)
    for doc in docs:
        builder.add_document(doc)
    builder.finalize(f"{prefix}.idx")


# ----------------------------------------------------------------------------- tokenizers


def test_build_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="SentencePieceTokenizer.*GPT2BPETokenizer"):
        build_tokenizer("BertWordPiece")
    with pytest.raises(FileNotFoundError, match="nope.model"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=tmp_path / "nope.model")
    (tmp_path / "garbage.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="garbage.model"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=tmp_path / "garbage.model")
    with pytest.raises(FileNotFoundError, match="missing-vocab.json"):
        build_tokenizer(
            "GPT2BPETokenizer", vocab_file=tmp_path / "missing-vocab.json", merge_file=GPT2_FILES["merge_file"]
        )
    with pytest.raises(FileNotFoundError, match="missing-merges.txt"):
        build_tokenizer(
            "GPT2BPETokenizer", vocab_file=GPT2_FILES["vocab_file"], merge_file=tmp_path / "missing-merges.txt"
        )


AUSTEN_SENTENCES = [
    "It is a truth universally acknowledged, that a single man in possession\n"
    "of a good fortune, must be in want of a wife.",
    "Emma Woodhouse, handsome, clever, and rich, with a comfortable home",
    '"My dear Mr. Bennet," said his lady to him one day, "have you heard that\nNetherfield Park is let at last?"',
    "Sorrow came--a gentle sorrow--but not at all in the shape of any",
    "  two  spaces, a tab\tand £10,000 a-year; naïve café 🙂  ",
]


def test_sentencepiece_round_trip_and_ids():
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=SP_MODEL)
    assert tok.name == "SentencePieceTokenizer"
    assert tok.vocab_size == 8000
    assert tok.eod == 2
    for s in AUSTEN_SENTENCES:
        ids = tok.tokenize(s)
        assert all(isinstance(i, int) and 0 <= i < 8000 for i in ids)
        assert tok.eod not in ids
        assert tok.detokenize(ids) == s  # lossless, newlines and whitespace runs included
    assert tok.detokenize(tok.tokenize("a\nb") + [tok.eod]) == "a\nb"  # EOD decodes to nothing
    # Pins the committed model: retraining with other options would change these ids.
    ids = tok.tokenize("It is a truth universally acknowledged, that a single man")
    assert ids == [590, 368, 261, 1900, 7310, 2716, 7939, 337, 261, 3160, 536]
    assert tok._sp.id_to_piece(ids[4]) == "▁universally"
    # A newline is one byte-fallback piece; digits are split one by one.
    assert [tok._sp.id_to_piece(i) for i in tok.tokenize("a\nb 1815")] == ["▁a", "<0x0A>", "b", "▁", "1", "8", "1", "5"]


def test_train_tokenizer_reproduces_committed_model(tmp_path):
    train_tokenizer = load_tool("train_tokenizer")
    prefix = tmp_path / "again"
    assert train_tokenizer.main(["--input", str(CORPUS), "--model-prefix", str(prefix), "--vocab-size", "8000"]) == 0
    assert (tmp_path / "again.model").read_bytes() == SP_MODEL.read_bytes()
    assert (tmp_path / "again.vocab").read_bytes() == SP_MODEL.with_suffix(".vocab").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.model", "again.vocab"]  # no temporaries


def test_bytes_to_unicode_table():
    table = bytes_to_unicode()
    assert len(table) == 256 and len(set(table.values())) == 256
    assert table[ord("A")] == "A" and table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[0] == "Ā"


def test_gpt2_bpe_hand_made_merges(tmp_path):
    # Vocab: the 256 byte symbols, then "ab", "abc", "Ġab" from three ranked merges.
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    for tok in ("ab", "abc", "Ġab", "<|endoftext|>"):
        vocab[tok] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\nab c\nĠ ab\n")
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=tmp_path / "vocab.json", merge_file=tmp_path / "merges.txt")
    a, b, c, space = (vocab[ch] for ch in "abcĠ")
    # "abc" -> a b c -> ab c -> abc; " abab" -> Ġ a b a b -> Ġ ab ab -> Ġab ab; "ba" has no merge.
    assert tok.tokenize("abc abab ba") == [256 + 1, 256 + 2, 256 + 0, space, b, a]
    assert tok.eod == 259 and tok.vocab_size == 260
    assert tok.detokenize(tok.tokenize("abc abab ba")) == "abc abab ba"


GPT2_STRINGS = [
    "Hello world",
    "It's a truth universally acknowledged, isn't it? I'll've they're WE'D",
    "numbers 1234567 and 3.14159, 2½ x² Ⅻ",
    "whitespace   runs\t\tand\n\n\nnewlines   ",
    "   leading spaces",
    "unicode: naïve café — “quotes” 日本語 🙂👍🏽 e\u0301",
    "odd spaces:\u00a0\u3000\u2009x\x1cy",
    "",
]


@pytest.mark.parametrize("use_regex", [True, False], ids=["regex", "re"])
def test_gpt2_bpe_matches_transformers(use_regex):
    transformers = pytest.importorskip("transformers")
    if use_regex:
        pytest.importorskip("regex")
    ours = GPT2BPETokenizer(GPT2_FILES["vocab_file"], GPT2_FILES["merge_file"], use_regex=use_regex)
    ref = transformers.GPT2Tokenizer(str(GPT2_FILES["vocab_file"]), str(GPT2_FILES["merge_file"]))
    assert ours.eod == ref.eos_token_id == 512
    assert ours.vocab_size == 513
    for s in GPT2_STRINGS:
        ids = ours.tokenize(s)
        assert ids == ref.encode(s), s
        assert ours.detokenize(ids) == s
    # Merges were applied (Austen words become single tokens), not just byte symbols.
    assert len(ours.tokenize(" little")) == 1


# ----------------------------------------------------------------------------- indexed dataset


def test_indexed_dataset_round_trip_exact_bytes(tmp_path):
    docs = [[1, 2, 3], [], [65000, 7]]
    prefix = tmp_path / "ds"
    write_dataset(prefix, docs, np.uint16)

    expected_idx = (
        b"MMIDIDX\x00\x00"
        + struct.pack("<Q", 1)  # version
        + struct.pack("<B", 8)  # uint16
        + struct.pack("<Q", 3)  # sequences
        + struct.pack("<Q", 4)  # doc_idx length
        + struct.pack("<3i", 3, 0, 2)  # sizes
        + struct.pack("<3q", 0, 6, 6)  # byte pointers
        + struct.pack("<4q", 0, 1, 2, 3)  # doc_idx
    )
    assert (tmp_path / "ds.idx").read_bytes() == expected_idx
    assert (tmp_path / "ds.bin").read_bytes() == struct.pack("<5H", 1, 2, 3, 65000, 7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds.bin", "ds.idx"]  # temporaries renamed

    ds = IndexedDataset(prefix)
    assert len(ds) == 3 and ds.dtype == np.uint16
    assert isinstance(ds.tokens, np.memmap)
    for i, doc in enumerate(docs):
        assert ds[i].dtype == np.uint16
        np.testing.assert_array_equal(ds[i], np.array(doc, dtype=np.uint16))
    np.testing.assert_array_equal(ds.sizes, [3, 0, 2])
    np.testing.assert_array_equal(ds.doc_idx, [0, 1, 2, 3])
    np.testing.assert_array_equal(ds.get(0, 1, 1), [2])
    np.testing.assert_array_equal(ds.get(2, 1), [7])
    np.testing.assert_array_equal(ds[-1], [65000, 7])
    with pytest.raises(IndexError):
        ds[3]
    assert ds.token_span(0, 3) == (0, 5)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(ds))[2], [65000, 7])


def test_indexed_dataset_int32_and_dtype_rule(tmp_path):
    assert best_dtype(8000) == np.uint16 and best_dtype(50257) == np.uint16
    assert best_dtype(65500) == np.int32 and best_dtype(128256) == np.int32
    write_dataset(tmp_path / "big", [[70000, 0, 128000]], np.int32)
    assert (tmp_path / "big.idx").read_bytes()[17] == 4  # Megatron's int32 code
    ds = IndexedDataset(tmp_path / "big")
    assert ds.dtype == np.int32
    np.testing.assert_array_equal(ds[0], [70000, 0, 128000])
    with pytest.raises(ValueError, match="do not fit uint16"):
        IndexedDatasetBuilder(tmp_path / "x.bin", np.uint16).add_document([70000])


def test_builder_writes_nothing_until_finalize(tmp_path):
    with IndexedDatasetBuilder(tmp_path / "part.bin", np.uint16) as builder:
        builder.add_document([1, 2])
        assert not (tmp_path / "part.bin").exists()
    assert list(tmp_path.iterdir()) == []  # leaving the context without finalize cleans up


@pytest.mark.parametrize(
    "damage, bad_file, message",
    [
        ("truncate_bin", "ds.bin", "truncated"),
        ("extend_bin", "ds.bin", "too large"),
        ("magic", "ds.idx", "bad magic"),
        ("version", "ds.idx", "version"),
        ("dtype", "ds.idx", "dtype code"),
        ("truncate_idx", "ds.idx", "truncated"),
        ("pointer", "ds.idx", "pointers"),
    ],
)
def test_corrupt_files_raise_value_error_naming_the_file(tmp_path, damage, bad_file, message):
    prefix = tmp_path / "ds"
    write_dataset(prefix, [[1, 2, 3], [4, 5]])
    idx, bin_ = tmp_path / "ds.idx", tmp_path / "ds.bin"
    data = bytearray(idx.read_bytes())
    if damage == "truncate_bin":
        bin_.write_bytes(bin_.read_bytes()[:-2])
    elif damage == "extend_bin":
        bin_.write_bytes(bin_.read_bytes() + b"\0\0")
    elif damage == "magic":
        idx.write_bytes(b"NOTANIDX!" + data[9:])
    elif damage == "version":
        idx.write_bytes(data[:9] + struct.pack("<Q", 2) + data[17:])
    elif damage == "dtype":
        data[17] = 42
        idx.write_bytes(data)
    elif damage == "truncate_idx":
        idx.write_bytes(data[:-8])
    elif damage == "pointer":
        pointers_at = 34 + 4 * 2
        idx.write_bytes(data[: pointers_at + 8] + struct.pack("<q", 4) + data[pointers_at + 16 :])
    with pytest.raises(ValueError, match=message) as info:
        IndexedDataset(prefix)
    assert str(tmp_path / bad_file) in str(info.value)


def test_missing_dataset_file(tmp_path):
    write_dataset(tmp_path / "ds", [[1]])
    (tmp_path / "ds.bin").unlink()
    with pytest.raises(FileNotFoundError, match="ds.bin"):
        IndexedDataset(tmp_path / "ds")


# ----------------------------------------------------------------------------- GPT dataset


def reference_sample(docs, split, name, seq_length, seed, g):
    """The contract of GPTDataset, computed from scratch in memory."""
    begin, end = split_ranges(split, len(docs))[("train", "valid", "test").index(name)]
    stream = np.concatenate([np.asarray(d, dtype=np.int64) for d in docs[begin:end]])
    windows = [stream[w * seq_length : w * seq_length + seq_length + 1] for w in range((len(stream) - 1) // seq_length)]
    epoch, i = divmod(g, len(windows))
    return windows[np.random.default_rng([seed, epoch]).permutation(len(windows))[i]]


@pytest.fixture
def random_docs(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 8000, size=int(n)).tolist() for n in rng.integers(1, 40, size=60)]
    write_dataset(tmp_path / "rand", docs)
    return tmp_path / "rand", docs


def test_gpt_dataset_windows_span_documents(tmp_path):
    write_dataset(tmp_path / "small", [[10, 11, 12], [13, 14], [15, 16, 17, 18]])
    ds = GPTDataset(tmp_path / "small", seq_length=3, seed=0, split="1")
    assert ds.windows_in_epoch == len(ds) == 2  # 9 tokens: (9 - 1) // 3
    assert {tuple(ds.window(w)) for w in range(2)} == {(10, 11, 12, 13), (13, 14, 15, 16)}
    sample = ds[0]
    assert sample.dtype == np.int64 and sample.shape == (4,)


@pytest.mark.parametrize("name", ["train", "valid", "test"])
def test_gpt_dataset_matches_reference(random_docs, name):
    prefix, docs = random_docs
    split, seq_length, seed = "80,15,5", 16, 1234
    ds = GPTDataset(prefix, seq_length, seed, split=split, name=name)
    n = ds.windows_in_epoch
    for g in [*range(n), *range(3 * n, 3 * n + 5), 10**9]:
        np.testing.assert_array_equal(ds[g], reference_sample(docs, split, name, seq_length, seed, g))
    restored = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(restored[n + 3], ds[n + 3])


def test_gpt_dataset_epochs_and_seeds(random_docs):
    prefix, _ = random_docs
    ds = GPTDataset(prefix, 8, seed=7, split="1")
    n = ds.windows_in_epoch
    all_windows = sorted(tuple(ds.window(w)) for w in range(n))
    epoch0 = [tuple(ds[g]) for g in range(n)]
    epoch1 = [tuple(ds[g]) for g in range(n, 2 * n)]
    assert sorted(epoch0) == sorted(epoch1) == all_windows  # each epoch visits every window once
    assert epoch0 != epoch1  # with a new order
    assert [tuple(GPTDataset(prefix, 8, seed=7, split="1")[g]) for g in range(n)] == epoch0
    assert [tuple(GPTDataset(prefix, 8, seed=8, split="1")[g]) for g in range(n)] != epoch0
    assert [tuple(x) for x in ds] == epoch0  # iteration is one epoch
    with pytest.raises(IndexError):
        ds[-1]


@pytest.mark.parametrize("split", ["969,30,1", "1", "98,2", "1/1/1", "0,1,1", "0,0,1", "7,0,3"])
@pytest.mark.parametrize("num_docs", [0, 1, 2, 3, 10, 99, 1000, 10298])
def test_split_ranges_tile_all_documents(split, num_docs):
    ranges = split_ranges(split, num_docs)
    assert ranges[0][0] == 0 and ranges[2][1] == num_docs
    assert ranges[0][1] == ranges[1][0] and ranges[1][1] == ranges[2][0]
    assert all(b <= e for b, e in ranges)


def test_split_ranges_known_values():
    assert split_ranges("969,30,1", 1000) == [(0, 969), (969, 999), (999, 1000)]
    assert split_ranges("969,30,1", 10298) == [(0, 9979), (9979, 10288), (10288, 10298)]
    assert split_ranges("98,2", 100) == [(0, 98), (98, 100), (100, 100)]
    with pytest.raises(ValueError, match="bad split"):
        split_ranges("a,b", 10)


def test_gpt_dataset_zero_windows_error(tmp_path):
    write_dataset(tmp_path / "tiny", [[1, 2, 3]])
    with pytest.raises(ValueError, match=r"tiny.*'1'.*'train'.*seq_length\+1 = 4"):
        GPTDataset(tmp_path / "tiny", seq_length=3, seed=0, split="1")
    assert len(GPTDataset(tmp_path / "tiny", seq_length=2, seed=0, split="1")) == 1


# ----------------------------------------------------------------------------- preprocess_data

TEXT = "\n\nFirst paragraph,\nstill the first.\n\n\n\nSecond one.\n   \n\t\nThird  one  \n\n   \n"
PARAGRAPHS = ["First paragraph,\nstill the first.", "Second one.", "Third  one"]


def read_docs(prefix) -> list[list[int]]:
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def test_preprocess_txt(tmp_path, capsys):
    preprocess_data = load_tool("preprocess_data")
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=SP_MODEL)
    (tmp_path / "in.txt").write_text(TEXT)
    args = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(SP_MODEL), "--append-eod"]
    out = tmp_path / "out"
    assert preprocess_data.main(["--input", str(tmp_path / "in.txt"), "--output-prefix", str(out), *args]) == 0
    assert "3 documents" in capsys.readouterr().out
    docs = read_docs(tmp_path / "out_text_document")
    assert docs == [tok.tokenize(p) + [tok.eod] for p in PARAGRAPHS]
    assert [tok.detokenize(d[:-1]) for d in docs] == PARAGRAPHS
    assert IndexedDataset(tmp_path / "out_text_document").dtype == np.uint16

    # .txt.xz input and two workers give byte-identical output.
    with lzma.open(tmp_path / "in.txt.xz", "wt") as f:
        f.write(TEXT)
    out2 = tmp_path / "out2"
    argv = ["--input", str(tmp_path / "in.txt.xz"), "--output-prefix", str(out2), "--workers", "2", *args]
    assert preprocess_data.main(argv) == 0
    for ext in (".bin", ".idx"):
        assert Path(f"{out2}_text_document{ext}").read_bytes() == Path(f"{out}_text_document{ext}").read_bytes()
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_preprocess_jsonl_gpt2(tmp_path):
    from megatron_ucp.data.preprocess import preprocess

    rows = [
        {"text": "Hello world", "title": "A"},
        {"text": "   ", "title": "Empty text"},
        {"text": "It's 2 o'clock\n", "title": "B"},
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = build_tokenizer("GPT2BPETokenizer", **GPT2_FILES)
    report = preprocess(
        tmp_path / "in.jsonl",
        tmp_path / "out",
        "GPT2BPETokenizer",
        **GPT2_FILES,
        json_keys=["text", "title"],
        append_eod=True,
    )
    assert report.outputs == {"text": f"{tmp_path}/out_text_document", "title": f"{tmp_path}/out_title_document"}
    assert report.skipped == 1 and report.documents == 5
    texts = ["Hello world", "It's 2 o'clock\n"]
    assert read_docs(tmp_path / "out_text_document") == [tok.tokenize(t) + [512] for t in texts]
    assert read_docs(tmp_path / "out_title_document") == [tok.tokenize(r["title"]) + [512] for r in rows]
    assert report.tokens == sum(len(tok.tokenize(t)) + 1 for t in texts + [r["title"] for r in rows])

    # Without --append-eod there is no EOD; a .txt input has only the key "text".
    preprocess_data = load_tool("preprocess_data")
    files = ["--vocab-file", str(GPT2_FILES["vocab_file"]), "--merge-file", str(GPT2_FILES["merge_file"])]
    argv = ["--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "noeod")]
    assert preprocess_data.main([*argv, "--tokenizer-type", "GPT2BPETokenizer", *files]) == 0
    assert read_docs(tmp_path / "noeod_text_document") == [tok.tokenize(t) for t in texts]
    (tmp_path / "in.txt").write_text("x")
    with pytest.raises(ValueError, match="only the key 'text'"):
        preprocess(tmp_path / "in.txt", tmp_path / "o", "GPT2BPETokenizer", **GPT2_FILES, json_keys=["title"])


def test_workers_read_the_input_a_window_at_a_time(tmp_path, monkeypatch):
    """Two workers over several windows write the same bytes as one, and the reader stays at most one
    window ahead of the writer (Pool.imap alone would queue the whole input)."""
    from megatron_ucp.data import preprocess as pp

    monkeypatch.setattr(pp, "_CHUNK", 2)
    monkeypatch.setattr(pp, "_WINDOW_CHUNKS", 1)  # windows of 4 documents with 2 workers
    docs = [f"Document {i} of the window test, {'word ' * (i % 7)}end." for i in range(23)]
    (tmp_path / "in.txt").write_text("\n\n".join(docs))
    outs = {}
    for workers in (1, 2):
        report = pp.preprocess(tmp_path / "in.txt", tmp_path / f"w{workers}", "SentencePieceTokenizer",
                               tokenizer_model=SP_MODEL, append_eod=True, workers=workers, progress=False)
        assert report.documents == 23
        outs[workers] = [Path(report.outputs["text"] + ext).read_bytes() for ext in (".bin", ".idx")]
    assert outs[1] == outs[2]

    consumed = []

    def counted():
        for i in range(100):
            consumed.append(i)
            yield {"text": str(i)}

    class SerialPool:
        def imap(self, fn, items, chunksize):
            return map(lambda d: {"text": [int(d["text"])]}, items)

    results = pp._in_windows(SerialPool(), counted(), workers=2)
    assert next(results) == {"text": [0]} and len(consumed) == 4  # one window read, not the whole input
    assert [r["text"][0] for r in results] == list(range(1, 100))
