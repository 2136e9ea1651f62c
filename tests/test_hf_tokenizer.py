"""HFTokenizer end to end: local Hugging Face tokenizer folders built here (no network) through preprocessing.

Two folders stand for the tokenizers people bring from the Hub: a byte-level BPE trained with the
``tokenizers`` library (GPT-2 / Llama-3 style), with and without a BOS prepended by its post-processor,
and a SentencePiece-backed Llama tokenizer made from the bundled ``austen-bpe-8k.model``. The ids
preprocessing writes must be exactly what ``AutoTokenizer.from_pretrained(folder)(text)["input_ids"]``
gives, plus EOD.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from megatron_ucp.data.indexed_dataset import IndexedDataset
from megatron_ucp.data.preprocess import preprocess, sidecar_path, split_paragraphs
from megatron_ucp.data.tokenizer import HFTokenizer, build_tokenizer, read_text
from helpers import CORPUS, SP_MODEL, load_tool
from helpers import byte_level_folder as _byte_level_folder

ROWS = [
    {"text": "It is a truth universally acknowledged.", "title": "Pride and Prejudice"},
    {"text": "   ", "title": "An empty text"},
    {"text": "Emma Woodhouse, handsome, clever,\nand rich.", "title": "Emma"},
]
PLAIN = "First paragraph,\nstill the first.\n\n\nSecond one, with an odd byte: \u00e9\u4e2d.\n\n  Third.  \n"


def _reference(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)


def _sentencepiece_folder(out: Path, work: Path) -> Path:
    work.mkdir()
    shutil.copyfile(SP_MODEL, work / "tokenizer.model")
    (work / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False}))
    _reference(work).save_pretrained(str(out))  # a fast tokenizer.json converted from the model
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_tokenizers")
    text = read_text(CORPUS)[:60_000]
    return {
        "byte_level_bos": _byte_level_folder(root / "bl_bos", text, bos=True),
        "byte_level": _byte_level_folder(root / "bl", text, bos=False),
        "sentencepiece": _sentencepiece_folder(root / "spm", root / "spm_src"),
    }


def read_docs(prefix) -> list[list[int]]:
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


@pytest.mark.parametrize("name", ["byte_level_bos", "byte_level", "sentencepiece"])
def test_ids_are_the_autotokenizer_ids_plus_eod(folders, tmp_path, name):
    folder = folders[name]
    ref = _reference(folder)
    tok = build_tokenizer("HFTokenizer", tokenizer_model=folder)
    assert tok.eod == ref.eos_token_id and tok.vocab_size == len(ref)
    if name.startswith("byte_level"):
        assert len(ref) == 401  # 400 learned + the added token
    eod = [ref.eos_token_id]

    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    tool = load_tool("preprocess_data")
    argv = ["--tokenizer-type", "HFTokenizer", "--tokenizer-model", str(folder), "--append-eod"]
    assert tool.main(["--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "j"),
                      "--json-keys", "text", "title", *argv]) == 0
    texts = [r["text"] for r in ROWS if r["text"].strip()]
    assert read_docs(tmp_path / "j_text_document") == [ref(t)["input_ids"] + eod for t in texts]
    assert read_docs(tmp_path / "j_title_document") == [ref(r["title"])["input_ids"] + eod for r in ROWS]

    (tmp_path / "in.txt").write_text(PLAIN)
    assert tool.main(["--input", str(tmp_path / "in.txt"), "--output-prefix", str(tmp_path / "t"), *argv]) == 0
    paragraphs = ["First paragraph,\nstill the first.", "Second one, with an odd byte: \u00e9\u4e2d.", "Third."]
    docs = read_docs(tmp_path / "t_text_document")
    assert docs == [ref(p)["input_ids"] + eod for p in paragraphs]
    # BOS comes first exactly where the folder says so (the byte-level one without it is the control).
    starts_with_bos = [d[0] == ref.bos_token_id for d in docs]
    assert starts_with_bos == [name != "byte_level"] * 3
    assert [tok.detokenize(d) for d in docs] == [ref.decode(d) for d in docs]


def test_two_workers_and_a_folder_input_give_the_same_bytes(folders, tmp_path):
    folder = folders["byte_level_bos"]
    paragraphs = split_paragraphs(read_text(CORPUS)[:120_000])
    assert len(paragraphs) > 2 * 64  # more than one chunk of the worker pool
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    half = len(paragraphs) // 2
    # Written in the reverse of name order: the folder is read sorted by name.
    (inputs / "b.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs[half:]))
    (inputs / "a.txt").write_text("\n\n".join(paragraphs[:half]))
    (inputs / "notes.md").write_text("not an input")
    kwargs = dict(tokenizer_model=folder, append_eod=True)
    one = preprocess(inputs, tmp_path / "one", "HFTokenizer", workers=1, **kwargs)
    two = preprocess(inputs, tmp_path / "two", "HFTokenizer", workers=2, **kwargs)
    for ext in (".bin", ".idx", ".tokenizer.json"):
        a = Path(f"{one.outputs['text']}{ext}").read_bytes()
        assert a == Path(f"{two.outputs['text']}{ext}").read_bytes(), ext
    ref = _reference(folder)
    assert read_docs(one.outputs["text"]) == [ref(p)["input_ids"] + [ref.eos_token_id] for p in paragraphs]
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]

    # A link inside the input folder is refused, naming it.
    os.symlink(inputs / "a.txt", inputs / "c.txt")
    with pytest.raises(ValueError, match=r"c\.txt: is a symbolic link"):
        preprocess(inputs, tmp_path / "three", "HFTokenizer", **kwargs)


def test_sidecar_records_the_identity_and_a_changed_file_changes_it(folders, tmp_path):
    folder = folders["sentencepiece"]
    (tmp_path / "in.txt").write_text(PLAIN)
    report = preprocess(tmp_path / "in.txt", tmp_path / "out", "HFTokenizer", tokenizer_model=folder)
    record = json.loads(Path(sidecar_path(report.outputs["text"])).read_text())
    tok = HFTokenizer(folder)
    assert record == {"type": "HFTokenizer", "sha256": tok.identity["sha256"], "vocab_size": 8000, "eod": 2}
    assert len(record["sha256"]) == 64

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    assert HFTokenizer(copy).identity == tok.identity  # the content counts, not the path
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config["model_max_length"] = 123  # a real change of a defining file, same ids
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    assert HFTokenizer(copy).identity["sha256"] != tok.identity["sha256"]

    # The other two kinds have an identity of their own kind too.
    sp = build_tokenizer("SentencePieceTokenizer", tokenizer_model=SP_MODEL).identity
    assert sp["type"] == "SentencePieceTokenizer" and sp["sha256"] != tok.identity["sha256"]


def test_bad_tokenizer_folders_are_refused_in_one_line(folders, tmp_path, capsys):
    tool = load_tool("preprocess_data")
    (tmp_path / "in.txt").write_text(PLAIN)

    def run(folder: Path) -> str:
        argv = ["--input", str(tmp_path / "in.txt"), "--output-prefix", str(tmp_path / "o"),
                "--tokenizer-type", "HFTokenizer", "--tokenizer-model", str(folder)]
        assert tool.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(folder) in err
        return err

    assert "not found" in run(tmp_path / "missing")

    no_eos = tmp_path / "no_eos"
    shutil.copytree(folders["byte_level"], no_eos)
    config = json.loads((no_eos / "tokenizer_config.json").read_text())
    config.pop("eos_token", None)
    (no_eos / "tokenizer_config.json").write_text(json.dumps(config))
    assert "no EOS token" in run(no_eos)

    linked = tmp_path / "linked"
    shutil.copytree(folders["byte_level"], linked)
    (linked / "tokenizer.json").unlink()
    os.symlink(folders["byte_level"] / "tokenizer.json", linked / "tokenizer.json")
    assert "symbolic link" in run(linked)

    fifo = tmp_path / "fifo"
    shutil.copytree(folders["byte_level"], fifo)
    os.mkfifo(fifo / "tokenizer.model")  # must be refused, not block the hash
    assert "tokenizer.model: not a regular file" in run(fifo)
    assert not list(tmp_path.glob("o_*"))  # nothing written


def test_trainer_flags_accept_an_hf_tokenizer_folder(folders, tmp_path):
    from megatron_ucp.training.arguments import configs_from_flags
    from helpers import TINY_FLAGS as TINY

    for suffix in (".bin", ".idx"):
        (tmp_path / f"d{suffix}").write_bytes(b"")
    base = [a for a in TINY if a != "--mock-data"] + ["--data-path", str(tmp_path / "d"),
                                                        "--tokenizer-type", "HFTokenizer"]
    _, cfg = configs_from_flags(base + ["--tokenizer-model", str(folders["byte_level"])], environ={})
    assert cfg.tokenizer_type == "HFTokenizer" and cfg.tokenizer_model == str(folders["byte_level"])
    with pytest.raises(ValueError, match=r"--tokenizer-model .*missing: no such folder"):
        configs_from_flags(base + ["--tokenizer-model", str(tmp_path / "missing")], environ={})


class _Terminal:
    """A stderr that says it is a terminal and keeps what is written to it."""

    def __init__(self) -> None:
        self.text = ""

    def isatty(self) -> bool:
        return True

    def write(self, s: str) -> int:
        self.text += s
        return len(s)

    def flush(self) -> None:
        pass


def test_progress_bar_only_on_a_terminal(folders, tmp_path, monkeypatch, capsys):
    (tmp_path / "in.txt").write_text(PLAIN)
    kwargs = dict(tokenizer_model=folders["byte_level"], log_interval=0)
    preprocess(tmp_path / "in.txt", tmp_path / "quiet", "HFTokenizer", **kwargs)
    assert capsys.readouterr().err == ""  # off a terminal: nothing

    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    preprocess(tmp_path / "in.txt", tmp_path / "bar", "HFTokenizer", **kwargs)
    assert "tokenizing" in terminal.text and "3 docs" in terminal.text
    drawn = terminal.text
    preprocess(tmp_path / "in.txt", tmp_path / "off", "HFTokenizer", progress=False, **kwargs)
    assert terminal.text == drawn  # progress=False: nothing more, even on a terminal
