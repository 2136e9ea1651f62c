"""Direct reads (``checkpoint/sliced.py``): a target TP rank's state tensor straight from ZeRO shards.

Real DeepSpeed checkpoints (GPT at TP2 DP2 and at TP1 DP3, whose DP partitions split parameters
unevenly; Llama at TP2 for the fused SwiGLU); for every parameter, state and target TP rank, the
tensor read equals the slice of our converter's atom (which equals DeepSpeed's converter's output)
at that layout, and the bytes read are exactly the target's own elements.
"""

import pytest
import torch

from dist_utils import run_distributed
from helpers import TINY_GPT, TINY_LLAMA, TINY_TRAIN, train_model
from megatron_ucp.checkpoint.sliced import atom_read_plan, read_local, read_plan, window_plan
from megatron_ucp.checkpoint.universal import MergeRule, conversion_rules, convert_zero_to_universal
from megatron_ucp.checkpoint.zero import STATE_KEYS, FlatRef, load_file, open_zero_checkpoint
from megatron_ucp.config import ModelConfig
from megatron_ucp.layout.params import Kind
from megatron_ucp.layout import slicing
from megatron_ucp.layout.placement import padded_vocab_size
from megatron_ucp.layout.slicing import pad_vocab, shard

pytestmark = [pytest.mark.dist, pytest.mark.slow]

# The tiny Llama at half width and depth (4 heads, ffn 48): a TP2 run on two processes.
LLAMA = dict(TINY_LLAMA, num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48)
# name: (model, tp, processes); gpt_tp2dp2 is the session's tiny_checkpoints(1, tp=2)
SOURCES = {"gpt_tp2dp2": (TINY_GPT, 2, 4), "gpt_tp1dp3": (TINY_GPT, 1, 3), "llama_tp2dp1": (LLAMA, 2, 2)}
TARGETS = {"gpt_tp2dp2": (1, 2, 4), "gpt_tp1dp3": (1, 2, 4), "llama_tp2dp1": (1, 2)}


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tiny_checkpoints):
    root = tmp_path_factory.mktemp("sliced")
    out = {"gpt_tp2dp2": tiny_checkpoints(1, tp=2)}
    for name, (model, tp, world) in SOURCES.items():
        if name in out:
            continue
        cfg = dict(TINY_TRAIN, tensor_model_parallel_size=tp, global_batch_size=world // tp * 2, train_iters=2,
                   save=str(root / name), save_interval=2, lr=1e-3)
        run_distributed(train_model, world, cfg, model)
        universal = root / f"{name}_u" / "global_step2_universal"
        convert_zero_to_universal(str(root / name / "global_step2"), str(universal))
        out[name] = (root / name / "global_step2", universal)
    return out


@pytest.mark.parametrize("name", list(SOURCES))
def test_every_rank_reads_exactly_its_slice(sources, name):
    zero, universal = sources[name]
    ckpt = open_zero_checkpoint(str(zero))
    rules = conversion_rules(ckpt, strict=True, inject_missing_state=False)
    cfg = ModelConfig.from_dict(ckpt.metadata["model_config"])
    checked = set()
    for pname, src in ckpt.param_sources.items():
        rule = rules[pname]
        for key in STATE_KEYS:
            full = load_file(str(universal / "zero" / pname / f"{key}.pt"))["param"]
            for tp in TARGETS[name]:
                extent = None
                if rule.kind is Kind.VOCAB:
                    extent = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, tp)
                    full_t = pad_vocab(full, extent)
                else:
                    full_t = full
                for r in range(tp):
                    plan = read_plan(ckpt, src, rule, key, tp, r, target_extent=extent)
                    got = read_local(plan)
                    want = shard(full_t, rule.kind, tp, r)
                    assert torch.equal(got, want), (pname, key, tp, r)
                    real = want.numel()
                    if rule.kind is Kind.VOCAB:  # padding rows are not read
                        rows = max(0, min(want.shape[0], cfg.vocab_size - r * want.shape[0]))
                        real = rows * want[0].numel()
                    assert plan.nbytes == real * 4, (pname, key, tp, r)
                    checked.add(rule.kind)
    assert checked >= {Kind.VOCAB, Kind.COLUMN, Kind.ROW, Kind.REPLICATED} or name.startswith("llama")
    if name.startswith("llama"):
        assert Kind.COLUMN_2SUB in checked


def test_a_wrong_source_rule_reads_the_wrong_bytes(sources):
    """Negative control: the SwiGLU weight planned as a plain column parameter (a layout the checkpoint
    does not have) reads bytes, but not the target's slice."""
    zero, universal = sources["llama_tp2dp1"]
    ckpt = open_zero_checkpoint(str(zero))
    name = "1.mlp.dense_h_to_4h.weight"
    full = load_file(str(universal / "zero" / name / "fp32.pt"))["param"]
    right = read_local(read_plan(ckpt, ckpt.param_sources[name], MergeRule(Kind.COLUMN_2SUB), "fp32", 1, 0))
    assert torch.equal(right, full)
    wrong = read_local(read_plan(ckpt, ckpt.param_sources[name], MergeRule(Kind.COLUMN), "fp32", 1, 0))
    assert wrong.shape == full.shape and not torch.equal(wrong, full)


def test_windows_are_what_a_zero_rank_owns(sources):
    """A target DP rank owns a flat window of its TP slice (uneven where the partition splits it):
    windows read alone join into the whole slice, each reading only its own bytes."""
    zero, universal = sources["gpt_tp1dp3"]
    ckpt = open_zero_checkpoint(str(zero))
    rules = conversion_rules(ckpt, strict=True, inject_missing_state=False)
    name = "1.self_attention.query_key_value.weight"
    whole = read_local(read_plan(ckpt, ckpt.param_sources[name], rules[name], "exp_avg", 2, 1))
    n = whole.numel()
    cuts = [0, n // 3 + 1, n - 5, n]  # uneven, as a DP partition boundary falls anywhere
    parts = []
    for lo, hi in zip(cuts, cuts[1:]):
        plan = read_plan(ckpt, ckpt.param_sources[name], rules[name], "exp_avg", 2, 1, window=(lo, hi))
        assert plan.nbytes == (hi - lo) * 4
        parts.append(read_local(plan))
    assert torch.equal(torch.cat(parts), whole.reshape(-1))
    with pytest.raises(Exception, match=r"window \[0, 100000\) is outside"):
        read_plan(ckpt, ckpt.param_sources[name], rules[name], "exp_avg", 2, 1, window=(0, 100_000))


def test_reading_into_a_given_tensor_zeroes_what_no_read_covers(sources):
    """The loader reads into the optimizer's own memory: the same values as a new tensor, the padding
    rows zeroed over whatever was there, and a destination of the wrong size refused."""
    zero, _ = sources["gpt_tp1dp3"]
    ckpt = open_zero_checkpoint(str(zero))
    rules = conversion_rules(ckpt, strict=True, inject_missing_state=False)
    name = "tied_modules.embed.word_embeddings.weight"
    src = ckpt.param_sources[name]
    kept = rules[name].kept_vocab_rows
    plan = read_plan(ckpt, src, rules[name], "fp32", 1, 0, target_extent=kept + 8)  # 8 padding rows
    want = read_local(plan)
    assert plan.nbytes == kept * want.shape[1] * 4 and want.shape[0] == kept + 8
    assert not want[-8:].any() and want[:kept].abs().sum() > 0  # the padding: no read lands there
    out = torch.full(want.shape, float("nan"))
    assert read_local(plan, out) is out and torch.equal(out, want)
    lo, hi = 5, want.numel() - 3
    part = window_plan(plan, (lo, hi), name)
    dst = torch.full((hi - lo,), 7.0)
    read_local(part, dst)
    assert torch.equal(dst, want.reshape(-1)[lo:hi])
    with pytest.raises(ValueError, match="is not the plan's"):
        read_local(plan, torch.empty(want.numel() - 1))


@pytest.mark.parametrize("name", list(SOURCES))
def test_universal_atoms_are_read_by_byte_range(sources, name):
    """The universal-folder reader: a target TP rank's slice of an atom (the full tensor, stored
    contiguously) read by byte range equals slicing the loaded atom, and reads only the slice's
    bytes (not the vocabulary padding rows, which are not in the atom)."""
    zero, universal = sources[name]
    ckpt = open_zero_checkpoint(str(zero))
    rules = conversion_rules(ckpt, strict=True, inject_missing_state=False)
    cfg = ModelConfig.from_dict(ckpt.metadata["model_config"])
    for pname in ckpt.param_sources:
        kind = rules[pname].kind
        path = str(universal / "zero" / pname / "exp_avg_sq.pt")
        full = load_file(path)["param"]
        ref = FlatRef.of(path, load_file(path, meta=True)["param"].reshape(-1))
        for tp in TARGETS[name]:
            extent = None
            full_t = full
            if kind is Kind.VOCAB:
                extent = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, tp)
                full_t = pad_vocab(full, extent)
            for r in range(tp):
                plan = atom_read_plan(ref, tuple(full.shape), kind, tp, r, target_extent=extent)
                want = shard(full_t, kind, tp, r)
                assert torch.equal(read_local(plan), want), (pname, tp, r)
                real = want.numel()
                if kind is Kind.VOCAB:
                    real = max(0, min(want.shape[0], cfg.vocab_size - r * want.shape[0])) * want[0].numel()
                assert plan.nbytes == real * 4, (pname, tp, r)
    # Negative control: the SwiGLU or QKV atom read as a plain column parameter is not the slice.
    pname = "1.mlp.dense_h_to_4h.weight" if name.startswith("llama") else "1.self_attention.query_key_value.weight"
    path = str(universal / "zero" / pname / "fp32.pt")
    full = load_file(path)["param"]
    ref = FlatRef.of(path, load_file(path, meta=True)["param"].reshape(-1))
    right = read_local(atom_read_plan(ref, tuple(full.shape), rules[pname].kind, 2, 1))
    assert torch.equal(right, shard(full, rules[pname].kind, 2, 1))
    if rules[pname].kind is not Kind.COLUMN:
        assert not torch.equal(read_local(atom_read_plan(ref, tuple(full.shape), Kind.COLUMN, 2, 1)), right)


@pytest.mark.parametrize("name", ["gpt_tp1dp3", "llama_tp2dp1"])
def test_one_plan_per_parameter_serves_every_state(sources, name):
    """The loader plans the fp32 master's reads and moves them to each moment's bytes (``rebased``): the
    same reads as planning each state on its own, from the ZeRO shards and from the universal atoms; and a
    plan moved to the wrong state's bytes reads other values."""
    from megatron_ucp.checkpoint.sliced import rebased
    from megatron_ucp.training.sliced_load import UniversalSource, ZeroSource

    zero, universal = sources[name]
    ckpt = open_zero_checkpoint(str(zero))
    rules = conversion_rules(ckpt, strict=True, inject_missing_state=False)
    cfg = ModelConfig.from_dict(ckpt.metadata["model_config"])
    for source in (ZeroSource(ckpt), UniversalSource(str(universal))):
        checked = 0
        for pname in ckpt.param_sources:
            kind = rules[pname].kind
            full = list(load_file(str(universal / "zero" / pname / "fp32.pt"), meta=True)["param"].shape)
            for tp in TARGETS[name]:
                if kind is Kind.VOCAB:
                    full[0] = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, tp)
                local = tuple(slicing.local_shape(kind, tuple(full), tp))
                for r in range(tp):
                    fp32 = source.plan(pname, "fp32", local, tp, r)
                    for key in ("exp_avg", "exp_avg_sq"):
                        assert rebased(fp32, source.moves(pname, "fp32", key)) == source.plan(pname, key, local, tp, r)
                    checked += 1
        assert checked >= len(ckpt.param_sources)
        wrong = rebased(fp32, source.moves(pname, "fp32", "exp_avg_sq"))
        assert not torch.equal(read_local(wrong), read_local(source.plan(pname, "exp_avg", local, tp, r)))
