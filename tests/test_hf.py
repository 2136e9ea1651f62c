"""Hugging Face <-> universal: GPT-2 and Llama (GQA, tied and untied) models built by ``transformers``
from local configs, converted to universal and loaded by our trainer at TP1PP1, TP2PP2 and TP1PP4,
give ``transformers``' fp32 logits within 1e-4; skipping the QKV reorder or the Conv1D transpose fails
that check; HF -> universal -> HF is bitwise in the source dtype and loads in ``transformers``; a
sharded checkpoint converts in less than twice its largest shard of memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from dist_utils import free_port
from helpers import REPO, assert_equal, assert_fails, load_tool
from megatron_ucp.checkpoint.zero import CheckpointError
from megatron_ucp.hf.from_universal import convert_universal_to_hf
from megatron_ucp.hf.logits import compare, hf_logits, our_logits_many, random_tokens
from megatron_ucp.hf.to_universal import convert_hf_to_universal

VOCAB, BATCH, SEQ, ATOL = 96, 2, 16, 1e-4
TOPOLOGIES = [(1, 1), (2, 2), (1, 4)]
MODELS = ("gpt2", "llama", "llama_tied")
CONTROLS = {"gpt2_no_qkv_reorder": ("gpt2", dict(_skip_qkv_reorder=True)),
            "gpt2_no_conv1d_transpose": ("gpt2", dict(_skip_conv1d_transpose=True)),
            "llama_no_qkv_reorder": ("llama", dict(_skip_qkv_reorder=True))}


def _hf_model(kind: str, dtype=torch.float32):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed({"gpt2": 1, "llama": 2, "llama_tied": 3}[kind])
    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=4, n_positions=32, bos_token_id=0,
                         eos_token_id=0)
        model = GPT2LMHeadModel(cfg)
    else:
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                          tie_word_embeddings=kind == "llama_tied", rope_theta=500.0)
        model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # HF zero-initialises biases and sets norms to one: make every tensor count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.to(dtype).eval()


def save_bin(model, folder, max_shard_bytes: int | None = None) -> None:
    """``pytorch_model.bin`` (+ index when sharded) as transformers 4.x's ``save_pretrained(safe_serialization=
    False)`` wrote it (transformers 5 writes only safetensors), with the real model's config."""
    os.makedirs(folder, exist_ok=True)
    model.config.save_pretrained(folder)
    tied = model.config.tie_word_embeddings
    sd = {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    if max_shard_bytes is None:
        torch.save(sd, os.path.join(folder, "pytorch_model.bin"))
        return
    shards, size = [{}], 0
    for k, v in sd.items():
        if shards[-1] and size + v.numel() * v.element_size() > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += v.numel() * v.element_size()
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
        torch.save(shard, os.path.join(folder, name))
        weight_map.update({k: name for k in shard})
    with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """Each model saved as safetensors (single and sharded, by transformers) and as .bin (single and sharded)."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for kind in MODELS:
        model = _hf_model(kind)
        model.save_pretrained(root / f"{kind}_st")
        model.save_pretrained(root / f"{kind}_st_sharded", max_shard_size="20KB")
        save_bin(model, root / f"{kind}_bin")
        save_bin(model, root / f"{kind}_bin_sharded", max_shard_bytes=20_000)
        out[kind] = root / f"{kind}_st"
    return root, out


@pytest.fixture(scope="module")
def universal(hf, tmp_path_factory):
    """Universal folders: one per model (from sharded safetensors) and one per negative control."""
    root, _ = hf
    out_root = tmp_path_factory.mktemp("universal")
    out = {}
    for kind in MODELS:
        out[kind] = out_root / kind / "hf_universal"
        convert_hf_to_universal(str(root / f"{kind}_st_sharded"), str(out[kind]))
    for name, (kind, flags) in CONTROLS.items():
        out[name] = out_root / name / "hf_universal"
        convert_hf_to_universal(str(root / f"{kind}_st"), str(out[name]), **flags)
    return out


@pytest.fixture(scope="module")
def tokens():
    return random_tokens(VOCAB, BATCH, SEQ, seed=7)


@pytest.fixture(scope="module")
def reference(hf, tokens):
    _, dirs = hf
    return {kind: hf_logits(str(dirs[kind]), tokens) for kind in MODELS}


@pytest.fixture(scope="module")
def ours(universal, tokens):
    """Our logits per topology, every folder of that topology evaluated on one set of spawned ranks."""
    cache = {}

    def get(tp, pp):
        if (tp, pp) not in cache:
            names = list(MODELS) + (list(CONTROLS) if (tp, pp) == (1, 1) else [])
            logits = our_logits_many([str(universal[n]) for n in names], tokens, tp, pp)
            cache[(tp, pp)] = dict(zip(names, logits))
        return cache[(tp, pp)]

    return get


def _assert_close(ref, got, what: str):
    result = compare(ref, got)
    print(f"{what}: {result.summary()}")
    assert result.max_abs <= ATOL, f"{what}: {result.summary()}"
    assert result.top1 == 1.0, f"{what}: {result.summary()}"


@pytest.mark.dist
@pytest.mark.parametrize("tp,pp", [pytest.param(t, p, id=f"tp{t}pp{p}",
                                                marks=[pytest.mark.slow] if (t, p) == (1, 4) else [])
                                   for t, p in TOPOLOGIES])  # PP4 in the full suite only (fast tier time)
def test_logits_match_transformers(reference, ours, tp, pp):
    got = ours(tp, pp)
    for kind in MODELS:
        _assert_close(reference[kind], got[kind], f"{kind} TP{tp} PP{pp}")


@pytest.mark.dist
def test_negative_controls_fail_the_logits_check(reference, ours):
    got = ours(1, 1)
    for name, (kind, _) in CONTROLS.items():
        print(f"{name}: {compare(reference[kind], got[name]).summary()}")
        assert_fails(lambda: _assert_close(reference[kind], got[name], name), name)


def _atoms(folder):
    out = {}
    zero = os.path.join(folder, "zero")
    for name in sorted(os.listdir(zero)):
        if name == "optimizer_state.pt":
            continue
        for key in ("fp32", "exp_avg", "exp_avg_sq", "step"):
            out[(name, key)] = torch.load(os.path.join(zero, name, f"{key}.pt"), weights_only=False)
    return out


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_every_format_converts_identically(hf, universal, tmp_path, kind):
    root, _ = hf
    want = _atoms(universal[kind])
    for fmt in ("st", "bin", "bin_sharded"):
        out = tmp_path / fmt / "u"
        convert_hf_to_universal(str(root / f"{kind}_{fmt}"), str(out))
        got = _atoms(out)
        assert got.keys() == want.keys()
        for key, atom in want.items():
            if key[1] == "step":
                assert_equal(got[key], atom, f"{fmt} {key}")
                continue
            assert {k: v for k, v in got[key].items() if k != "param"} == \
                   {k: v for k, v in atom.items() if k != "param"}, key
            assert_equal(got[key]["param"], atom["param"], f"{fmt} {key}")


def test_universal_folder_layout(universal):
    folder = universal["llama"]
    atoms = _atoms(folder)
    qkv = atoms[("1.self_attention.query_key_value.weight", "fp32")]
    assert qkv["param"].dtype == torch.float32 and qkv["param"].shape == ((4 + 2 * 2) * 8, 32) and qkv["cat_dim"] == 0
    swiglu = atoms[("1.mlp.dense_h_to_4h.weight", "fp32")]
    assert swiglu["param_n_sub_params"] == 2 and swiglu["param"].shape == (96, 32)
    assert atoms[("0.word_embeddings.weight", "fp32")]["vocab_tensor"] is True
    assert atoms[("1.self_attention.dense.weight", "fp32")]["cat_dim"] == 1
    assert set(atoms[("1.input_layernorm.weight", "fp32")]) == {"param"}
    for (name, key), atom in atoms.items():
        if key in ("exp_avg", "exp_avg_sq"):
            assert not atom["param"].any() and atom["param"].shape == atoms[(name, "fp32")]["param"].shape, name
        if key == "step":
            assert float(atom) == 0.0
    assert (folder.parent / "latest_universal").read_text() == folder.name
    state = torch.load(folder / "mp_rank_00_model_states.pt", weights_only=False)
    assert state["global_steps"] == 0 and state["mp_world_size"] == 1 and state["iteration"] == 0
    assert state["lr_scheduler"] == {"num_steps": 0}
    assert state["megatron_ucp"]["model_config"]["num_key_value_heads"] == 2
    assert (folder / "zero_pp_rank_0_mp_rank_00_model_states.pt").is_file()
    optim = torch.load(folder / "zero" / "optimizer_state.pt", weights_only=False)
    assert [g["name"] for g in optim["param_groups"]] == ["decay", "no_decay"]
    assert optim["param_groups"][1]["weight_decay"] == 0.0 and optim["ds_version"]
    step = optim["optimizer_state_dict"]["state"][0]["step"]
    assert torch.is_tensor(step) and step.dtype == torch.float32 and float(step) == 0.0  # Adam needs a tensor
    assert not [p for p in os.listdir(folder.parent) if ".tmp-" in p]


def _safetensors(folder):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, f)))
    return out


@pytest.mark.parametrize("kind,dtype", [("gpt2", torch.float32), ("llama", torch.bfloat16),
                                        ("llama_tied", torch.float32)])
def test_round_trip_is_bitwise_and_loads(tmp_path, kind, dtype):
    from transformers import AutoModelForCausalLM

    src = tmp_path / "src"
    model = _hf_model(kind, dtype)
    model.save_pretrained(src, max_shard_size="30KB")
    convert_hf_to_universal(str(src), str(tmp_path / "u" / "hf_universal"))
    back = tmp_path / "back"
    convert_universal_to_hf(str(tmp_path / "u" / "hf_universal"), str(back), max_shard_size="30KB")
    want, got = _safetensors(src), _safetensors(back)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == dtype, name
        assert_equal(got[name], want[name], name)
    assert (back / "model.safetensors.index.json").is_file()
    config = json.loads((back / "config.json").read_text())
    assert config["dtype"] == {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    loaded = AutoModelForCausalLM.from_pretrained(back, dtype=dtype)
    for name, t in model.state_dict().items():
        assert_equal(loaded.state_dict()[name], t, f"from_pretrained {name}")


def test_errors_name_the_file_and_the_problem(hf, tmp_path):
    root, dirs = hf
    bad = tmp_path / "bert"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"}))
    with pytest.raises(CheckpointError, match="BertForMaskedLM.*supported: GPT2LMHeadModel.*LlamaForCausalLM"):
        convert_hf_to_universal(str(bad), str(tmp_path / "o1" / "u"))

    import shutil

    sharded = tmp_path / "sharded"
    shutil.copytree(root / "llama_st_sharded", sharded)
    victim = sorted(p for p in os.listdir(sharded) if p.endswith(".safetensors"))[1]
    os.remove(sharded / victim)
    with pytest.raises(CheckpointError, match=f"{victim}: missing shard"):
        convert_hf_to_universal(str(sharded), str(tmp_path / "o2" / "u"))

    wrong = tmp_path / "wrong"
    shutil.copytree(dirs["gpt2"], wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["n_head"] = 8  # same tensors, but then c_attn would not split into these heads: shapes still fit
    cfg["n_positions"] = 64  # wpe no longer fits
    (wrong / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model.safetensors: transformer.wpe.weight has shape \(32, 32\)"):
        convert_hf_to_universal(str(wrong), str(tmp_path / "o3" / "u"))
    assert not (tmp_path / "o3").exists() or not os.listdir(tmp_path / "o3")

    rope = tmp_path / "rope"
    shutil.copytree(dirs["llama"], rope)
    cfg = json.loads((rope / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 2.0, "rope_theta": 500.0}
    (rope / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: rope_type='yarn' is not supported \(supported: "
                                              r"default, linear, llama3\)"):
        convert_hf_to_universal(str(rope), str(tmp_path / "o4" / "u"))


def test_tools_are_thin_clis(hf, tmp_path, capsys):
    _, dirs = hf
    to_u, to_hf = load_tool("hf_to_universal"), load_tool("universal_to_hf")
    assert to_u.main(["--hf_checkpoint_dir", str(dirs["gpt2"]), "--save_dir", str(tmp_path / "u" / "x"),
                      "--safe_serialization"]) == 0
    assert to_hf.main(["--input_folder", str(tmp_path / "u" / "x"), "--output_dir", str(tmp_path / "h"),
                       "--dtype", "fp32"]) == 0
    assert to_u.main(["--hf_checkpoint_dir", str(tmp_path / "missing"), "--save_dir", str(tmp_path / "v")]) == 2
    assert "missing" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "h")) == ["config.json", "generation_config.json",
                                                  "megatron_ucp_complete.json", "model.safetensors"]


_MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from megatron_ucp.hf.to_universal import convert_hf_to_universal
    from megatron_ucp.hf.reader import open_hf_checkpoint

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    warm, src, dst = sys.argv[1:4]
    # A tiny model of the same family and format first: lazy imports and one-time library set-up
    # (about 75 MB here) belong to the baseline, not to the conversion.
    convert_hf_to_universal(warm, dst + "_warm")
    open_hf_checkpoint(src)
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    base = status("VmRSS")
    convert_hf_to_universal(src, dst)
    print(json.dumps({"base": base, "peak": status("VmHWM")}))
""")


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_sharded_conversion_memory_stays_below_two_shards(tmp_path, fmt):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=8000, hidden_size=512, intermediate_size=1536,
                                         num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                                         max_position_embeddings=64))
    src, warm = tmp_path / "src", tmp_path / "warm"
    tiny = _hf_model("llama")
    if fmt == "safetensors":
        model.save_pretrained(src, max_shard_size="24MB")
        tiny.save_pretrained(warm, max_shard_size="20KB")
    else:
        save_bin(model, src, max_shard_bytes=24_000_000)
        save_bin(tiny, warm, max_shard_bytes=20_000)
    del model
    shards = [os.path.getsize(src / f) for f in os.listdir(src) if f.endswith((".safetensors", ".bin"))]
    assert len(shards) >= 3
    # A fixed malloc mmap threshold: glibc otherwise raises it after each large free, so later tensors of
    # that size come from the heap and their freed pages stay in RSS; the peak then measured the
    # allocator's history (1.4x-2.3x the largest shard across identical runs), not what was held.
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(warm), str(src), str(tmp_path / "u" / "x")],
                         env=env, capture_output=True, text=True, check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = (m["peak"] - m["base"]) / max(shards)
    print(f"{fmt}: {len(shards)} shards, largest {max(shards) / 1e6:.1f} MB, total {sum(shards) / 1e6:.1f} MB; "
          f"peak RSS growth {(m['peak'] - m['base']) / 1e6:.1f} MB = {ratio:.2f}x the largest shard")
    assert ratio < 2.0


def _first_loss(rank, world_size, load, stage, out):
    from megatron_ucp.config import TrainConfig
    from megatron_ucp.hf.logits import model_kwargs_of
    from megatron_ucp.training.trainer import train

    kwargs, vocab = model_kwargs_of(os.path.join(load, "hf_universal"))
    # One --finetune step at learning rate 0: the loss printed for it is the loaded model's.
    cfg = TrainConfig(zero_stage=stage, no_pipeline_parallel=stage > 1, micro_batch_size=BATCH,
                      global_batch_size=BATCH, seq_length=SEQ, train_iters=1, lr=0.0, min_lr=0.0, weight_decay=0.0,
                      finetune=True, dtype="fp32", mock_data=True, vocab_size=vocab, load=load,
                      universal_checkpoint=True, eval_interval=0, log_interval=1)
    result = train(kwargs, cfg)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result.last_loss, f)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_hf_import_loads_under_zero_2_and_3(hf, universal, tmp_path, stage):
    """The same folder loads into the non-pipeline model under ZeRO-2/3 (stage 3 reads the step and
    hyperparameters from optimizer_state_dict): its first loss is transformers' loss on that batch."""
    import numpy as np

    from dist_utils import run_distributed
    from megatron_ucp.training.data import MockDataset

    _, dirs = hf
    data = MockDataset(VOCAB, SEQ, 1234)  # the trainer's mock samples 0 and 1 (its default seed)
    batch = torch.from_numpy(np.stack([data[0], data[1]]))
    logits = hf_logits(str(dirs["llama"]), batch[:, :-1])
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1)).item()
    out = tmp_path / "loss.json"
    run_distributed(_first_loss, 1, str(universal["llama"].parent), stage, str(out))
    got = json.loads(out.read_text())
    print(f"ZeRO-{stage}: first loss {got:.8f}, transformers {want:.8f}")
    assert abs(got - want) <= 1e-5


@pytest.mark.slow
def test_finetune_recipe_continues_pretraining_a_hub_style_folder_with_its_own_tokenizer(tmp_path):
    """The recipe end to end on a folder as the Hub gives one: a Llama 3.1-style model (llama3 rope scaling,
    head_dim 32 != 64 / 4) with a 32k byte-level BPE tokenizer beside it, built here. HF_DIR=<folder>
    DATA=<jsonl>: the text is tokenized with that tokenizer, 20 iterations at TP2 PP2 lower the validation
    loss, and the export (with the tokenizer) matches transformers and generates."""
    import re

    from megatron_ucp.data.tokenizer import HFTokenizer

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    hf_dir = tmp_path / "my_llama"
    build = [sys.executable, "-m", "megatron_ucp.hf.build", "--family", "llama", "--byte-level-bpe", "32000",
             "--num-layers", "2", "--hidden-size", "64", "--num-heads", "4", "--num-kv-heads", "2",
             "--ffn-hidden-size", "128", "--max-position-embeddings", "64", "--set", "head_dim=32",
             "--set", f"rope_parameters={json.dumps(rope)}", "--output-dir", str(hf_dir)]
    proc = subprocess.run(build, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tokenizer = HFTokenizer(hf_dir)
    assert tokenizer.vocab_size == 32000 and json.loads((hf_dir / "config.json").read_text())["vocab_size"] == 32000
    # DATA: the user's own text, here 2,000 paragraphs of the bundled corpus as jsonl
    from helpers import CORPUS
    from megatron_ucp.data.preprocess import split_paragraphs
    from megatron_ucp.data.tokenizer import read_text

    data = tmp_path / "my_text.jsonl"
    data.write_text("".join(json.dumps({"text": p}) + "\n" for p in split_paragraphs(read_text(CORPUS))[:2000]))
    env = dict(os.environ, OUTPUT_DIR=str(tmp_path / "out"), HF_DIR=str(hf_dir), DATA=str(data), TRAIN_ITERS="20",
               EVAL_INTERVAL="10", EVAL_ITERS="2", LOG_INTERVAL="5", SEQ_LEN="32", MASTER_PORT=str(free_port()),
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    recipe = REPO / "examples_deepspeed" / "universal_checkpointing" / "run_hf_finetune.sh"
    proc = subprocess.run(["bash", str(recipe)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "out" / "hf_finetune_llama_fp32_z1_tp2_pp2_dp1_sp1"
    # the data: the user's text in the folder's own tokenizer, cached under its hash
    made = sorted((tmp_path / "out" / "data").glob("*_text_document.idx"))
    assert len(made) == 1 and made[0].name.startswith("my_text_"), made
    assert f"_tok{tokenizer.identity['sha256'][:12]}_" in made[0].name
    # the model's own sizes (from its config.json), and the validation loss before and after
    train_log = (run / "train.log").read_text()
    assert "fine-tuning from" in train_log and "vocab 32000 (padded 32000)" in train_log
    before, after = (float(x) for x in re.search(
        r"^validation loss: (\S+) before the first step, (\S+) after iteration 20 \(lower\)$", proc.stdout,
        flags=re.M).groups())
    print(f"validation loss {before} -> {after}")
    assert after < before
    valid = [json.loads(line) for line in (run / "loss.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in valid if r["split"] == "valid"] == [0, 10, 20]
    assert (run / "plots" / "validation_loss.png").stat().st_size > 0
    log = (run / "logits_check.log").read_text()
    print(re.findall(r"^(?:TP|generate).*$", log, flags=re.M))
    max_abs = float(re.search(r"max \|dlogit\| (\S+)", log).group(1))
    assert max_abs <= ATOL and "top-1 agreement 100.00%" in log
    assert re.search(r"^generate: .+ -> '.+'$", log, flags=re.M)
    export = run / "hf_export"
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= set(os.listdir(export))
    assert (export / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(export)
    assert model.config.rope_parameters == rope and model.config.head_dim == 32
    assert (model.config.bos_token_id, model.config.eos_token_id) == (0, 1)  # the tokenizer's, not lost in training
    src = torch.load(run / "universal" / "global_step20_universal" / "zero" / "3.final_layernorm.weight" / "fp32.pt",
                     weights_only=False)["param"]
    assert_equal(model.model.norm.weight.detach(), src, "final norm after fine-tuning")
