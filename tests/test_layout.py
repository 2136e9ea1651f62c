"""The pure layout module: topology arithmetic, the parameter table, slicing and UCP patterns."""

import re

import pytest
import torch

from megatron_ucp.config import ModelConfig
from megatron_ucp.layout import slicing
from megatron_ucp.layout.init import full_init
from megatron_ucp.layout.params import Kind, Role, model_params, pipe_entries, spec_of
from megatron_ucp.layout.topology import ParallelLayout
from megatron_ucp.layout.ucp_info import categories, universal_checkpoint_info

CFG = ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, vocab_size=50, max_position_embeddings=16,
                  make_vocab_size_divisible_by=8)


@pytest.mark.parametrize("tp,pp,dp", [(1, 1, 1), (2, 2, 2), (4, 1, 2), (1, 4, 2), (2, 1, 3)])
def test_topology_matches_deepspeed(tp, pp, dp):
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    ds = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    ours = ParallelLayout(tp=tp, pp=pp, dp=dp)
    for rank in range(ours.world_size):
        c = ds.get_coord(rank)
        assert ours.coords(rank) == type(ours.coords(rank))(pp=c.pipe, dp=c.data, tp=c.model)
        assert ours.rank(c.pipe, c.data, c.model) == rank
    assert sorted(ours.tp_groups()) == sorted(ds.get_axis_comm_lists("model"))
    assert sorted(ours.dp_groups()) == sorted(ds.get_axis_comm_lists("data"))
    assert sorted(ours.pp_groups()) == sorted(ds.get_axis_comm_lists("pipe"))


def test_layout_rejects_bad_degrees():
    with pytest.raises(ValueError, match="parallel degree tp must be a positive integer"):
        ParallelLayout(tp=0)
    with pytest.raises(ValueError, match="world size 6 is not divisible by tensor parallel 4"):
        ParallelLayout.from_world_size(6, tp=4)


def test_pipe_entries_and_names():
    entries = pipe_entries(CFG)
    assert [e.role for e in entries] == [Role.EMBED] + [Role.BLOCK] * 4 + [Role.FINAL_NORM, Role.HEAD]
    names = [p.name for p in model_params(CFG)]
    assert names[:2] == ["tied_modules.embed.word_embeddings.weight", "tied_modules.embed.position_embeddings.weight"]
    assert "1.self_attention.query_key_value.weight" in names and "4.mlp.dense_4h_to_h.bias" in names
    assert names[-2:] == ["5.final_layernorm.weight", "5.final_layernorm.bias"]
    assert len(names) == len(set(names)) == 2 + 4 * 12 + 2


def test_spec_of_is_unique_and_refuses_unknown_names():
    for info in model_params(CFG):
        assert spec_of(info.name, CFG) is info.spec
    with pytest.raises(ValueError, match="'1.mlp.gate.weight' matches no entries"):
        spec_of("1.mlp.gate.weight", CFG)


LLAMA = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=8, num_key_value_heads=2, vocab_size=50,
                    max_position_embeddings=16, make_vocab_size_divisible_by=8, swiglu=True, normalization="rmsnorm",
                    use_rotary_position_embeddings=True, tie_embeddings=False, add_bias_linear=False,
                    ffn_hidden_size=96, model_family="llama")
GPT_UNTIED = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=50, max_position_embeddings=16,
                         tie_embeddings=False, add_bias_linear=False)


@pytest.mark.parametrize("cfg", [CFG, LLAMA, GPT_UNTIED], ids=["gpt2", "llama-gqa", "gpt-untied-nobias"])
def test_every_name_matches_exactly_its_declared_patterns(cfg):
    """Each name is matched by the UCP lists its Kind declares, by one pattern per list, and by no other list;
    every emitted pattern matches some name (DeepSpeed's strict mode)."""
    info = universal_checkpoint_info(cfg, padded_vocab_size=64)
    lists = {k: v for k, v in info.items() if isinstance(v, list)}
    used = set()
    for p in model_params(cfg):
        matched = {}
        for key, patterns in lists.items():
            hits = [pat for pat in patterns if re.match(pat, p.name)]
            assert len(hits) <= 1, f"{p.name} matched {hits} in {key}"
            if hits:
                matched[key] = hits[0]
                used.add(hits[0])
        assert set(matched) == categories(p.spec), p.name
    assert used == {pat for patterns in lists.values() for pat in patterns}
    # Anchored: a longer name with the same prefix matches nothing.
    for patterns in lists.values():
        for pat in patterns:
            assert not re.match(pat, "1.mlp.dense_4h_to_h.weight_extra")
            assert pat.endswith("$")


def test_ucp_info_has_every_list_at_tp1():
    info = universal_checkpoint_info(CFG, padded_vocab_size=56)
    assert info["original_vocab_size"] == 50 and info["padded_vocab_size"] == 56
    assert info["universal_checkpoint_version"] == 0.4
    assert r"\d+\.self_attention\.dense\.weight$" in info["parameter_with_row_parallelism_patterns"]
    assert r"\d+\.mlp\.dense_4h_to_h\.weight$" in info["parameter_with_row_parallelism_patterns"]
    assert info["vocabulary_parameter_patterns"] == [r"tied_modules\.embed\.word_embeddings\.weight$"]
    assert sorted(info["pipeline_replicated_parameter_patterns"]) == sorted(
        [r"tied_modules\.embed\.word_embeddings\.weight$", r"tied_modules\.embed\.position_embeddings\.weight$"])


def test_padded_vocab_and_ranges():
    assert slicing.padded_vocab_size(50, 8, 1) == 56
    assert slicing.padded_vocab_size(50, 8, 2) == 64
    assert slicing.padded_vocab_size(8000, 128, 2) == 8192
    assert slicing.vocab_range(64, 2, 1) == (32, 64)
    with pytest.raises(ValueError, match="padded vocab 63 is not divisible by tensor parallel 2"):
        slicing.vocab_range(63, 2, 0)


@pytest.mark.parametrize("kind,dim", [(Kind.COLUMN, 0), (Kind.ROW, 1), (Kind.VOCAB, 0)])
def test_shard_merge_round_trip(kind, dim):
    full = torch.arange(8 * 12, dtype=torch.float32).reshape(8, 12)
    shards = [slicing.shard(full, kind, 4, r) for r in range(4)]
    assert all(s.shape[dim] == full.shape[dim] // 4 for s in shards)
    assert torch.equal(shards[1], full.narrow(dim, full.shape[dim] // 4, full.shape[dim] // 4))
    assert torch.equal(slicing.merge(shards, kind), full)
    # Negative control: merging in the wrong order does not give the full tensor back.
    assert not torch.equal(slicing.merge(shards[::-1], kind), full)


def test_replicated_merge_refuses_drift():
    a = torch.ones(4)
    assert torch.equal(slicing.merge([a, a.clone()], Kind.REPLICATED), a)
    b = a.clone()
    b[2] = 1.0 + 2**-20
    with pytest.raises(ValueError, match="replicated parameter differs between TP rank 0 and TP rank 1"):
        slicing.merge([a, b], Kind.REPLICATED)


def test_bitwise_equal_compares_bits_not_values():
    nan = torch.tensor([1.0, float("nan"), 3.0])
    assert not torch.equal(nan, nan.clone())  # why values are not enough: a NaN state never matches its copy
    assert slicing.bitwise_equal(nan, nan.clone())
    zero = torch.zeros(3)
    assert torch.equal(zero, -zero)  # ...and a flipped sign bit passes as a value
    assert not slicing.bitwise_equal(zero, -zero)
    other_nan = nan.clone()
    other_nan.view(torch.int32)[1] ^= 1  # another NaN payload: different bits
    assert not slicing.bitwise_equal(nan, other_nan)
    for dtype in (torch.bfloat16, torch.float16, torch.float64, torch.complex64, torch.int64, torch.bool):
        t = torch.arange(6).reshape(2, 3).to(dtype)
        assert slicing.bitwise_equal(t, t.clone())
        assert not slicing.bitwise_equal(t, t.flip(0))  # the control: other elements, other bits
    full = torch.arange(12.0).reshape(3, 4)
    assert slicing.bitwise_equal(full[:, 1:3], full.clone()[:, 1:3])  # strided views
    assert not slicing.bitwise_equal(full, full.double())  # dtype differs
    assert not slicing.bitwise_equal(full, full.reshape(4, 3))  # shape differs


def test_replicated_merge_compares_bits():
    a = torch.tensor([0.0, float("nan")])
    assert slicing.bitwise_equal(slicing.merge([a, a.clone()], Kind.REPLICATED), a)
    with pytest.raises(ValueError, match="replicated parameter differs between TP rank 0 and TP rank 1"):
        slicing.merge([a, torch.tensor([-0.0, float("nan")])], Kind.REPLICATED)


def test_shard_refuses_indivisible():
    with pytest.raises(ValueError, match="tensor parallel 3 does not divide dim 0"):
        slicing.shard(torch.zeros(8, 4), Kind.COLUMN, 3, 0)


def test_vocab_pad_unpad():
    t = torch.randn(50, 4)
    p = slicing.pad_vocab(t, 64)
    assert p.shape == (64, 4) and torch.equal(p[:50], t) and not p[50:].any()
    assert torch.equal(slicing.unpad_vocab(p, 50), t)


def test_full_init_is_layout_free_and_seeded_by_name():
    infos = {p.name: p for p in model_params(CFG)}
    w = full_init(infos["1.self_attention.query_key_value.weight"], CFG, seed=7)
    assert torch.equal(w, full_init(infos["1.self_attention.query_key_value.weight"], CFG, seed=7))
    assert not torch.equal(w, full_init(infos["2.self_attention.query_key_value.weight"], CFG, seed=7))
    assert not torch.equal(w, full_init(infos["1.self_attention.query_key_value.weight"], CFG, seed=8))
    emb = full_init(infos["tied_modules.embed.word_embeddings.weight"], CFG, seed=7, padded_vocab=64)
    assert emb.shape == (64, 32) and not emb[50:].any()
    dense = full_init(infos["1.self_attention.dense.weight"], CFG, seed=7)
    assert 0.002 < dense.std().item() < 0.008  # scaled by 1/sqrt(2 * num_layers)
    assert torch.equal(full_init(infos["1.input_layernorm.weight"], CFG, seed=7), torch.ones(32))


def test_model_config_validation():
    with pytest.raises(ValueError, match="hidden_size 30 is not divisible by num_attention_heads 4"):
        ModelConfig(num_layers=1, hidden_size=30, num_attention_heads=4, vocab_size=10, max_position_embeddings=8)
    with pytest.raises(ValueError, match="tensor parallel 3 does not divide num_attention_heads 4"):
        CFG.check_tensor_parallel(3)
    with pytest.raises(ValueError, match="pipeline parallel 8 needs at least 8 layers"):
        CFG.check_pipeline_parallel(8)
    assert ModelConfig.from_dict(CFG.to_dict()) == CFG
    with pytest.raises(ValueError, match="unknown ModelConfig keys: bogus"):
        ModelConfig.from_dict(dict(CFG.to_dict(), bogus=1))


def test_llama_table():
    names = {p.name: p for p in model_params(LLAMA)}
    assert "0.word_embeddings.weight" in names and "4.lm_head.weight" in names
    assert not any("position_embeddings" in n or n.endswith(".bias") for n in names)
    assert names["1.self_attention.query_key_value.weight"].full_shape == ((8 + 2 * 2) * 8, 64)
    assert names["1.mlp.dense_h_to_4h.weight"].kind is Kind.COLUMN_2SUB
    assert names["1.mlp.dense_h_to_4h.weight"].full_shape == (192, 64)
    info = universal_checkpoint_info(LLAMA, padded_vocab_size=56)
    assert info["parameter_with_2_sub_params_cat_dim_0"] == [r"\d+\.mlp\.dense_h_to_4h\.weight$"]
    assert info["pipeline_replicated_parameter_patterns"] == []
    assert sorted(info["vocabulary_parameter_patterns"]) == [r"\d+\.lm_head\.weight$", r"\d+\.word_embeddings\.weight$"]
    with pytest.raises(ValueError, match="tensor parallel 4 does not divide num_key_value_heads 2"):
        LLAMA.check_tensor_parallel(4)
    with pytest.raises(ValueError, match="add --disable-bias-linear"):
        ModelConfig(**dict(LLAMA.to_dict(), add_bias_linear=True))
    with pytest.raises(ValueError, match="needs --swiglu, --normalization rmsnorm and"):
        ModelConfig(**dict(LLAMA.to_dict(), swiglu=False, num_key_value_heads=8))
    with pytest.raises(ValueError, match="grouped-query attention .* is only built for the Llama family"):
        ModelConfig(**dict(GPT_UNTIED.to_dict(), num_key_value_heads=2))
