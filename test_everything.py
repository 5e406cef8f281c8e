"""The test suite: python -m pytest test_everything.py

Every test compares behaviour with an independent reference (a brute-force version, a second code path, an
invariant), on tiny configs, so the whole file runs in a few minutes on 2 CPU cores.
"""
import contextlib
import copy
import json
import math
import os
import random
import re
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import align
import config as config_module
import dpo
import export_hf
import instruct
import pretrain
import shapes_encoder
from config import CONFIG, ConfigError
from data import shapes_world
from data.prepare_text import (ASSISTANT_ID, BOS_ID, EOS_ID, EOT_ID, IMAGE_ID, PAD_ID, SPECIAL_TOKENS, USER_ID,
                               DataError, prepare, train_tokenizer)
from pretrain import MoE, Transformer, generate

REPO = os.path.dirname(os.path.abspath(__file__))
TINY = dict(config_module.CONFIG, vocab_size=64, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=48,
            moe_hidden=24, n_experts=4, top_k=2, attn_chunk=8, context=32)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = Transformer(dict(TINY, **overrides))
    with torch.no_grad():  # move norms away from 1 so that a wrong norm cannot hide
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()


# ----------------------------------------------------------------------------------------------------------
# The model against brute-force references
# ----------------------------------------------------------------------------------------------------------

def reference_attention(attn, x, offset=0):
    """Attention written the slow, obvious way: complex-number RoPE, repeated KV heads, a mask from loops."""
    B, T, _ = x.shape
    H, KV, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = (x @ attn.q_proj.weight.T).view(B, T, H, hd)
    k = (x @ attn.k_proj.weight.T).view(B, T, KV, hd)
    v = (x @ attn.v_proj.weight.T).view(B, T, KV, hd)
    pos = torch.arange(offset, offset + T, dtype=torch.float64)
    if attn.use_rope:
        freqs = torch.tensor([10000.0 ** (-2 * i / hd) for i in range(hd // 2)], dtype=torch.float64)
        rotation = torch.polar(torch.ones(T, hd // 2, dtype=torch.float64), pos[:, None] * freqs)[None, :, None]
        as_complex = lambda t: torch.view_as_complex(t.double().reshape(*t.shape[:-1], hd // 2, 2))
        q = torch.view_as_real(as_complex(q) * rotation).flatten(-2).float()
        k = torch.view_as_real(as_complex(k) * rotation).flatten(-2).float()
        q = q / torch.sqrt(q.pow(2).mean(-1, keepdim=True) + attn.eps)
        k = k / torch.sqrt(k.pow(2).mean(-1, keepdim=True) + attn.eps)
    else:
        temp = [1 + attn.attn_scale * math.log(math.floor((p + 1) / attn.floor_scale) + 1) for p in pos.tolist()]
        q = q * torch.tensor(temp)[None, :, None, None]
    k, v = k.repeat_interleave(H // KV, dim=2), v.repeat_interleave(H // KV, dim=2)  # GQA as plain MHA
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(hd)
    mask = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        for j in range(T):
            same_chunk = (i + offset) // attn.chunk == (j + offset) // attn.chunk
            mask[i, j] = j <= i and (same_chunk or not attn.use_rope)
    out = torch.einsum("bhij,bjhd->bihd", scores.masked_fill(~mask, float("-inf")).softmax(-1), v)
    return out.reshape(B, T, H * hd) @ attn.o_proj.weight.T


@pytest.mark.parametrize("T", [8, 24, 13])  # one chunk, whole chunks (the folded path), a ragged tail (mask path)
def test_attention_matches_brute_force(T):
    model = tiny_model(floor_scale=4)  # a small floor_scale makes the NoPE temperature differ from 1
    x = torch.randn(2, T, TINY["dim"])
    rope = (model.rope_cos, model.rope_sin)
    for layer in model.layers:  # layers 0-2 are RoPE + chunked, layer 3 is NoPE + global
        got = layer.attn(x, rope)
        torch.testing.assert_close(got, reference_attention(layer.attn, x), atol=2e-5, rtol=1e-4)


def test_chunked_mask_matches_brute_force():
    for length, offset, chunk in [(20, 0, 8), (1, 13, 8), (5, 6, 4), (7, 0, None)]:
        got = pretrain.attention_mask(length, offset, chunk, torch.device("cpu"))
        for i in range(length):
            for j in range(offset + length):
                q = i + offset
                expect = j <= q and (chunk is None or j // chunk == q // chunk)
                assert bool(got[i, j]) == expect, (length, offset, chunk, i, j)
    # The picture in attention_mask's docstring (RoPE layer on the left, NoPE on the right) is what it builds.
    rows = [line.split() for line in pretrain.attention_mask.__doc__.splitlines() if line.strip().startswith("q ")]
    for side, chunk in ((slice(2, 10), 4), (slice(12, 20), None)):
        drawn = torch.tensor([[mark == "x" for mark in row[side]] for row in rows])
        assert torch.equal(drawn, pretrain.attention_mask(8, 0, chunk, torch.device("cpu"))), chunk


def test_gqa_flag_equals_repeating_the_kv_heads():
    """What Attention's docstring says enable_gqa=True means: query head h uses K/V head h // group."""
    q, k, v = torch.randn(2, 6, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)  # 6 query, 2 KV heads
    grouped = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    repeated = F.scaled_dot_product_attention(q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1),
                                              is_causal=True)
    torch.testing.assert_close(grouped, repeated)
    assert not torch.allclose(grouped, F.scaled_dot_product_attention(  # the other layout, head h -> h % 2, differs
        q, k.repeat(1, 3, 1, 1), v.repeat(1, 3, 1, 1), is_causal=True))


def test_rope_depends_only_on_relative_position():
    cos, sin = pretrain.rope_angles(16, 64, 10000.0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    rotated = lambda t, p: pretrain.apply_rope(t, cos[p:p + 1], sin[p:p + 1])
    dot = lambda m, n: (rotated(q, m) * rotated(k, n)).sum().item()
    assert dot(5, 2) == pytest.approx(dot(40, 37), abs=1e-5)
    assert dot(9, 9) == pytest.approx(dot(0, 0), abs=1e-5)
    assert dot(5, 2) != pytest.approx(dot(5, 3), abs=1e-3)
    assert rotated(q, 7).norm().item() == pytest.approx(q.norm().item(), rel=1e-5)  # a rotation keeps length


def test_causality():
    model = tiny_model()
    tokens = torch.randint(0, TINY["vocab_size"], (1, 24))
    changed = tokens.clone()
    changed[0, 12] = (changed[0, 12] + 1) % TINY["vocab_size"]
    with torch.no_grad():
        before, after = model(tokens)[0], model(changed)[0]
    torch.testing.assert_close(before[:, :12], after[:, :12])
    assert (before[:, 12] - after[:, 12]).abs().max() > 1e-4


@pytest.mark.parametrize("n_layers", [4, 3])  # the last block: NoPE + MoE (the default's); RoPE + dense
def test_last_block_at_targets_equals_the_full_forward(n_layers):
    """at_targets (phases 2-4) runs the last block only where there is a target. Against the full forward: the
    same logits at those positions, the same loss, the same gradient of every parameter. Rows with different
    numbers of targets, one with none; targets on both sides of a chunk boundary; the NoPE temperature on."""
    model = tiny_model(n_layers=n_layers, floor_scale=4).train()
    tokens = torch.randint(0, TINY["vocab_size"], (3, 20))
    targets = torch.full((3, 20), -100)
    targets[0, [3, 4, 9, 17]] = tokens[0, [4, 5, 10, 18]]  # chunk 8: positions 3-4, 9, 17 in three chunks
    targets[1, 12:19] = tokens[1, 13:20]
    positions = pretrain.target_positions(targets)
    assert positions.tolist()[0][:4] == [3, 4, 9, 17] and positions.tolist()[1] == list(range(12, 19))
    assert (targets.gather(1, positions)[2] == -100).all()  # row 2: no target, only filler positions
    runs = []
    for at_targets in (False, True):
        model.zero_grad()
        logits, loss, _ = model(tokens, targets=targets, at_targets=at_targets)
        loss.backward()  # without the MoE's balancing loss: that one counts the last layer's routed tokens only
        runs.append((logits, loss, {name: p.grad.clone() for name, p in model.named_parameters()
                                    if p.grad is not None}))
    (full, full_loss, full_grads), (kept, kept_loss, kept_grads) = runs
    has_target = targets.gather(1, positions) != -100
    torch.testing.assert_close(kept[has_target], pretrain.rows_at(full, positions)[has_target], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(kept_loss, full_loss)
    assert kept_grads.keys() == full_grads.keys()
    for name, grad in full_grads.items():
        torch.testing.assert_close(kept_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("batch, length", [(2, 5), (1, 1)])  # grouped matmul; one token's gathered experts
def test_moe_matches_per_token_loop(batch, length):
    torch.manual_seed(0)
    moe = MoE(TINY)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(batch, length, TINY["dim"], requires_grad=True)
    got, _, counts = moe(x)
    swiglu = lambda h, e: (F.silu(h @ moe.experts.gate_proj[e]) * (h @ moe.experts.up_proj[e])) @ moe.experts.down_proj[e]
    expected, chosen = [], [0] * TINY["n_experts"]
    for b in range(batch):
        for t in range(length):
            token = x[b, t]
            logits = token @ moe.router.weight.T
            expect = moe.shared_expert(token)
            for e in logits.topk(TINY["top_k"]).indices.tolist():
                expect = expect + swiglu(token * torch.sigmoid(logits[e]), e)  # the gate scales the input
                chosen[e] += 1
            torch.testing.assert_close(got[b, t], expect, atol=1e-5, rtol=1e-4)
            expected.append(expect)
    # The reported load is, expert by expert, the number of (token, expert) pairs the loop computed; a sum
    # alone would hold for any counts that add up to N * top_k.
    assert counts.tolist() == chosen and sorted(chosen) != [chosen[0]] * len(chosen)
    # Gradients too: the sorted path has its own backward (PermuteRows), the loop plain autograd.
    weights = torch.randn(batch * length, TINY["dim"])
    inputs = [x, *moe.parameters()]
    got_grads = torch.autograd.grad((got.reshape(-1, TINY["dim"]) * weights).sum(), inputs, allow_unused=True)
    loop_grads = torch.autograd.grad((torch.stack(expected) * weights).sum(), inputs, allow_unused=True)
    for name, a, b in zip(["x"] + [n for n, _ in moe.named_parameters()], got_grads, loop_grads):
        if b is None:  # experts no token chose
            b = torch.zeros_like(a) if a is not None else None
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("batch, length", [(2, 5), (1, 1)])  # sorted + grouped matmul; gathered experts
def test_moe_fast_path_equals_its_per_expert_loop(batch, length):
    """MoE.routed_experts (the speed devices) computes what MoE.experts_loop (the idea, plainly) does."""
    torch.manual_seed(1)
    moe = MoE(TINY)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(batch * length, TINY["dim"])
    top_logits, top_experts = moe.router(x).topk(TINY["top_k"], dim=-1)
    gates = torch.sigmoid(top_logits)
    counts = pretrain.count_slots(top_experts, TINY["n_experts"])
    assert counts.tolist() == [(top_experts == e).sum().item() for e in range(TINY["n_experts"])]
    torch.testing.assert_close(moe.routed_experts(x, gates, top_experts, counts),
                               moe.experts_loop(x, gates, top_experts), atol=1e-5, rtol=1e-4)
    out, _, _ = moe(x.view(batch, length, -1))
    expected = moe.shared_expert(x) + moe.experts_loop(x, gates, top_experts)  # combine
    torch.testing.assert_close(out.view(-1, TINY["dim"]), expected, atol=1e-5, rtol=1e-4)


def test_aux_loss_hand_example():
    """4 experts, top-2, 3 tokens: the Switch loss n_experts * sum_i f_i * P_i worked by hand. With more than 2
    experts a sigmoid is not the softmax, and with top_k 2 the slot share f_i divides by N * top_k = 6, not N."""
    moe = MoE(dict(TINY, dim=8, n_experts=4, top_k=2, moe_hidden=8))
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(4, 8))  # router logits = the first four input features
    logits = [[2.0, 1.0, 0.0, -1.0],   # picks experts 0 and 1
              [0.0, 3.0, 1.0, 0.5],    # picks 1 and 2
              [1.0, -2.0, 0.0, 2.0]]   # picks 3 and 0
    x = torch.zeros(1, 3, 8)
    x[0, :, :4] = torch.tensor(logits)
    _, aux, counts = moe(x)
    assert counts.tolist() == [2, 2, 1, 1]
    f = [2 / 6, 2 / 6, 1 / 6, 1 / 6]  # share of the 6 routed slots
    softmax = lambda row: [math.exp(a) / sum(math.exp(b) for b in row) for a in row]
    P = [sum(softmax(row)[i] for row in logits) / 3 for i in range(4)]  # mean router probability
    assert P == pytest.approx([0.30833, 0.34602, 0.09430, 0.25136], abs=1e-5)
    assert aux.item() == pytest.approx(4 * sum(fi * pi for fi, pi in zip(f, P)), rel=1e-6)
    assert aux.item() == pytest.approx(1.10290, abs=1e-5)


def test_kv_cache_matches_full_recompute_across_chunk_boundary():
    model = tiny_model()
    tokens = torch.randint(0, TINY["vocab_size"], (2, 26))
    with torch.no_grad():
        full = model(tokens)[0]
        cache = pretrain.KVCache(model, 2, 26)
        pieces = [model(tokens[:, :5], cache=cache)[0], model(tokens[:, 5:11], cache=cache)[0]]  # crosses 8
        pieces += [model(tokens[:, t:t + 1], cache=cache)[0] for t in range(11, 26)]        # crosses 16, 24
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=2e-5, rtol=1e-4)


def test_generate_greedy_matches_argmax_loop():
    model = tiny_model()
    prompt = torch.randint(0, TINY["vocab_size"], (1, 6))
    got = generate(model, prompt, 14, stop_ids=()).tolist()[0]
    seq = prompt[0].tolist()
    with torch.no_grad():
        for _ in range(14):
            seq.append(model(torch.tensor([seq]))[0][0, -1].argmax().item())
    assert got == seq[6:]


def test_generate_stops_at_the_context_and_pads_finished_rows():
    """Two prompts of 28 tokens in a context of 32, asked for 10 tokens: generation stops after the 4 that fit
    (a longer run would overflow the position tables). Row 0 is made to stop early by naming its own third
    token a stop id: from there it repeats <|end_of_text|>, while row 1 goes on exactly as it does alone."""
    model = tiny_model()
    prompts = torch.randint(0, TINY["vocab_size"], (2, 28), generator=torch.Generator().manual_seed(0))
    free = generate(model, prompts, 10, stop_ids=())
    assert free.shape == (2, TINY["context"] - 28)
    alone = [generate(model, prompts[i:i + 1], 10, stop_ids=())[0].tolist() for i in range(2)]
    assert free.tolist() == alone
    stop = alone[0][1]
    assert stop not in alone[1] and stop not in alone[0][:1]  # this seed: row 1 never meets row 0's stop id
    stopped = generate(model, prompts, 10, stop_ids=(stop,)).tolist()
    assert stopped[0] == alone[0][:2] + [EOS_ID] * 2 and stopped[1] == alone[1]


def test_sampled_generation_replays_softmax_of_logits_over_t():
    """generate with temperature 0.7 and top-k 5 against a second path: full recompute of the logits at every
    step, the top 5 kept by sorting, probabilities from exp((logit - max) / T), drawn with a generator seeded
    alike. The same random numbers must pick the same tokens."""
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # logits a few units apart, so that the temperature matters
    prompt = torch.randint(0, TINY["vocab_size"], (1, 5), generator=torch.Generator().manual_seed(6))
    got = generate(model, prompt, 12, temperature=0.7, top_k=5, stop_ids=(),
                   generator=torch.Generator().manual_seed(7))[0].tolist()
    g, seq = torch.Generator().manual_seed(7), prompt[0].tolist()
    with torch.no_grad():
        for _ in range(12):
            logits = model(torch.tensor([seq]))[0][0, -1].double()
            fifth = logits.sort(descending=True).values[4]
            weights = torch.where(logits >= fifth, ((logits - logits.max()) / 0.7).exp(), torch.zeros_like(logits))
            seq.append(torch.multinomial((weights / weights.sum()).float()[None], 1, generator=g).item())
    assert got == seq[5:] and len(set(got)) > 1
    logits = torch.tensor([[0.5, 0.25, 0.25, 0.0]]).log().expand(400, -1)  # probabilities .5 .25 .25 0
    g = torch.Generator().manual_seed(0)
    assert set(pretrain.sample_next(logits, 1.0, top_p=0.5, generator=g).tolist()) == {0}  # .5 reaches 0.5
    kept = set(pretrain.sample_next(logits, 1.0, top_p=0.6, generator=g).tolist())  # .5 + one of the .25s
    assert 0 in kept and len(kept) == 2
    assert set(pretrain.sample_next(logits, 1.0, top_p=0.8, generator=g).tolist()) == {0, 1, 2}
    assert set(pretrain.sample_next(logits, 1.0, top_k=1, generator=g).tolist()) == {0}
    assert pretrain.sample_next(logits, 0.0).tolist() == [0] * 400


def sampled_shares(logits, n, **sampling):
    """How often sample_next picks each id, over n draws from one row of logits."""
    draws = pretrain.sample_next(logits.expand(n, -1), generator=torch.Generator().manual_seed(0), **sampling)
    return (torch.bincount(draws, minlength=logits.shape[-1]).float() / n).tolist()


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sampling_at_a_temperature_draws_from_p_to_the_power_1_over_t(temperature):
    """Dividing the logits by T turns probabilities p into p^(1/T), renormalised: computed here from p with no
    softmax. 40,000 draws put each share within 0.01 (4 standard deviations); multiplying by T instead of
    dividing would give p^T, off by 0.2 or more."""
    p = [0.5, 0.3, 0.15, 0.05]
    powered = [q ** (1 / temperature) for q in p]
    expected = [q / sum(powered) for q in powered]
    got = sampled_shares(torch.tensor([p]).log(), 40_000, temperature=temperature)
    assert got == pytest.approx(expected, abs=0.01)


def test_top_k_keeps_every_logit_tied_with_the_kth():
    """top-k filtering keeps the logits >= the k-th largest, so logits tied with the k-th all stay (as
    transformers' top-k does): the choice never depends on which of equal tokens has the lower id."""
    logits = torch.tensor([[2.0, 1.0, 1.0, 1.0, 0.0, -1.0]])
    kept = [math.exp(2.0), math.exp(1.0), math.exp(1.0), math.exp(1.0)]  # ids 0-3; ids 4 and 5 are cut
    expected = [w / sum(kept) for w in kept] + [0.0, 0.0]
    assert sampled_shares(logits, 40_000, temperature=1.0, top_k=2) == pytest.approx(expected, abs=0.01)
    assert sampled_shares(logits, 4000, temperature=1.0, top_k=1)[0] == 1.0  # no tie at the top: id 0 only


def test_seed_parameter_count():
    seed = config_module.get_config("pretrain", ["--preset=llama4_seed"])
    with torch.device("meta"):
        model = Transformer(seed)
    assert pretrain.count_parameters(model) == (223_795_968, 138_861_312)
    assert [b.is_moe for b in model.layers] == [i % 2 == 1 for i in range(12)]
    assert [b.use_rope for b in model.layers] == [i % 4 != 3 for i in range(12)]


# ----------------------------------------------------------------------------------------------------------
# Tokenizer and data
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    cfg = dict(config_module.CONFIG, shapes_docs=3000, vocab_size=320,
               data_dir=str(tmp_path_factory.mktemp("data") / "shapes"))
    prepare(cfg)
    return cfg


def test_tokenizer_round_trips_any_unicode_and_reserves_special_ids(tiny_data):
    tokenizer = pretrain.load_tokenizer(tiny_data["data_dir"])
    rng = random.Random(0)
    valid = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    texts = ["a red circle 🟥🔺 naïve café 日本語 \t\n  spaces", "\x00\x01\x7f\x80\xff\ufffd\U0010ffff",
             "e\u0301 combining", "<|image|> and <|eot|> inside text", ""]
    texts += ["".join(chr(rng.choice(valid)) for _ in range(rng.randint(1, 30))) for _ in range(200)]
    for text in texts:
        ids = pretrain.encode(tokenizer, text)
        assert tokenizer.decode(ids, skip_special_tokens=False) == text
    for token_id, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == token_id


def test_copy_losses_agree_with_the_models_own_loss(tiny_data):
    """pretrain.copy_losses reads log-probabilities of the restated attribute words itself; the model's own loss,
    with targets on exactly those words and -100 elsewhere, is a second path to each group's mean."""
    tokenizer = pretrain.load_tokenizer(tiny_data["data_dir"])
    model = tiny_model(vocab_size=320, context=128).eval()
    scores = pretrain.copy_losses(model, tokenizer, n_scenes=4)
    groups = {"copy color": shapes_world.COLORS, "copy kind": shapes_world.KINDS, "copy size": shapes_world.SIZES}
    assert scores and set(scores) <= set(groups)
    for name, words in groups.items():  # a word the small tokenizer splits is not scored: both paths skip it
        losses = []
        for scene in shapes_world.make_scenes("val", 4, seed=1):
            said = shapes_world.caption(scene)
            tokens = [BOS_ID] + pretrain.encode(tokenizer, f"this picture shows {said}\nagain: {said}")
            restated = len(tokens) - len(pretrain.encode(tokenizer, said))
            targets = [t if i >= restated and tokenizer.decode([t]).strip() in words else -100
                       for i, t in enumerate(tokens)][1:] + [-100]
            n = sum(t != -100 for t in targets)
            with torch.no_grad():
                _, loss, _ = model(torch.tensor([tokens]), targets=torch.tensor([targets]))
            losses += [loss.item()] * n
        assert scores.get(name) == (pytest.approx(sum(losses) / len(losses), rel=1e-5) if losses else None)


def test_token_stream_wraps_documents_and_holds_out_val_documents(tiny_data):
    tokenizer = pretrain.load_tokenizer(tiny_data["data_dir"])
    tokens = np.fromfile(os.path.join(tiny_data["data_dir"], "train.bin"), dtype=np.uint16).tolist()
    ends = [i for i, t in enumerate(tokens) if t == EOS_ID]
    assert tokens[0] == BOS_ID and tokens[-1] == EOS_ID
    assert all(tokens[i + 1] == BOS_ID for i in ends[:-1])
    documents = {}
    for split in ("train", "val"):  # every document of each stream, read back between its markers
        stream = np.fromfile(os.path.join(tiny_data["data_dir"], f"{split}.bin"), dtype=np.uint16).tolist()
        text = tokenizer.decode(stream, skip_special_tokens=False)
        assert text.startswith("<|begin_of_text|>") and text.endswith("<|end_of_text|>")
        documents[split] = [d.removeprefix("<|begin_of_text|>") for d in text.split("<|end_of_text|>")[:-1]]
        assert all(d and "<|" not in d for d in documents[split])
    n = tiny_data["shapes_docs"]
    assert documents["train"] == shapes_world.text_documents("train", n, seed=tiny_data["seed"])
    assert documents["val"] == shapes_world.text_documents("val", n // 50, seed=tiny_data["seed"])
    # Held out by content: the scene each document states, read back from its words whatever the phrasing
    # (scenes_in_text), is never one a training document states.
    trained = {frozenset(scenes_in_text(d)) for d in documents["train"]}
    held_out = [frozenset(scenes_in_text(d)) for d in documents["val"]]
    assert all(held_out) and not set(held_out) & trained


def test_local_files_prepare(tmp_path):
    docs = [f"document number {i} says hello" for i in range(120)]
    (tmp_path / "a.txt").write_text("\n\n".join(docs[:60]))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs[60:100]))
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": docs[100:]}), tmp_path / "c.parquet")
    source = ",".join(str(tmp_path / name) for name in ("a.txt", "b.jsonl", "c.parquet"))
    meta = prepare(dict(config_module.CONFIG, text_source=source, vocab_size=300, data_dir=str(tmp_path / "out")))
    assert meta["train_documents"] + meta["val_documents"] == 120 and meta["val_documents"] == 120 // 50
    tokenizer = pretrain.load_tokenizer(str(tmp_path / "out"))
    val = np.fromfile(tmp_path / "out" / "val.bin", dtype=np.uint16).tolist()
    assert tokenizer.decode(val, skip_special_tokens=True) == docs[49] + docs[99]
    # The folder is reused only for the settings it was prepared with.
    cfg = dict(config_module.CONFIG, text_source=source, vocab_size=300, data_dir=str(tmp_path / "out"))
    assert pretrain.ensure_text_data(cfg)["train_documents"] == meta["train_documents"]
    with pytest.raises(DataError, match="max_tokens=5000000 \\(now 700\\)"):
        pretrain.ensure_text_data(dict(cfg, max_tokens=700))
    with pytest.raises(DataError, match="text_source"):
        pretrain.ensure_text_data(dict(cfg, text_source="shapes"))
    # max_tokens cuts exactly; "<|image|>" written in a document is text, not the control token.
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": d + " <|image|>"}) for d in docs))
    meta = prepare(dict(cfg, text_source=str(tmp_path / "d.jsonl"), max_tokens=700, data_dir=str(tmp_path / "d")))
    train = np.fromfile(tmp_path / "d" / "train.bin", dtype=np.uint16)
    assert meta["train_tokens"] == len(train) == 700 and IMAGE_ID not in train
    for bad, phrase in [({"text": None}, "text field"), ({"body": "x"}, "text field")]:
        (tmp_path / "bad.jsonl").write_text(json.dumps(bad))
        with pytest.raises(DataError, match=phrase):
            prepare(dict(cfg, text_source=str(tmp_path / "bad.jsonl"), data_dir=str(tmp_path / "bad")))
    with pytest.raises(DataError, match="needs 263 to 65536 ids"):
        prepare(dict(cfg, vocab_size=100, data_dir=str(tmp_path / "small")))
    with pytest.raises(DataError, match="--max_tokens=10 stops reading after 2 documents"):
        prepare(dict(cfg, max_tokens=10, data_dir=str(tmp_path / "few")))


def test_config_overrides_are_typed():
    cfg = config_module.get_config("pretrain", ["--max_iters=7", "--lr", "0.5", "--compile", "--device=cpu"])
    assert (cfg["max_iters"], cfg["lr"], cfg["compile"], cfg["device"]) == (7, 0.5, True, "cpu")
    assert config_module.get_config("pretrain", ["--preset=llama4_seed"])["dim"] == 768
    for bad in (["--nope=1"], ["--max_iters=abc"], ["--compile=maybe"], ["--preset=huge"], ["stray"],
                ["--dtype=bf16"], ["--top_p=0"], ["--top_k_sampling=-1"], ["--temperature=-1"],
                ["--eval_interval=0"], ["--grad_accum_steps=0"], ["--n_heads=3", "--n_kv_heads=2", "--dim=48"],
                ["--top_k=9"], ["--head_dim=5"], ["--max_new_tokens=-1"]):
        with pytest.raises(config_module.ConfigError):
            config_module.get_config("pretrain", bad)
    for bad in ["gpu", "cuda:x"] + ([] if torch.cuda.is_available() else ["cuda"]):
        with pytest.raises(config_module.ConfigError):
            pretrain.setup_device(dict(device=bad))


# ----------------------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------------------

class FixedBatches:
    """A given list of training batches, served in order (cycling), and a fixed validation batch."""

    def __init__(self, batches):
        self.batches, self.position = batches, 0

    def next(self, split="train"):
        batch = self.batches[self.position % len(self.batches)]
        self.position += 1
        return batch

    def eval_batches(self):
        return self.batches[:1]

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def loop_config(tmp_path, **overrides):
    base = dict(TINY, out_dir=str(tmp_path), device="cpu", max_iters=1, warmup_iters=1, eval_interval=1000,
                log_interval=1000, lr=1e-2, min_lr=1e-2, aux_loss_coef=0.0, grad_clip=0.0, resume=False)
    return dict(base, **overrides)


def random_batch(seed, batch_size, length=16):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, TINY["vocab_size"], (batch_size, length + 1), generator=g)
    return dict(tokens=tokens[:, :-1], targets=tokens[:, 1:])


def split_batch(batch, parts):
    return [{k: v.chunk(parts)[i] for k, v in batch.items()} for i in range(parts)]


def test_overfits_one_batch(tmp_path):
    model = tiny_model().train()
    history = pretrain.train(loop_config(tmp_path, max_iters=150), model, FixedBatches([random_batch(0, 4)]))
    assert history[0][1] > 3.5 and history[-1][1] < 0.05


def test_learning_rate_warms_up_decays_by_cosine_and_stays_at_the_floor():
    """lr_at against values worked by hand: warmup 4 steps to lr 1.0 (step s gives (s + 1) / 4), then half a
    cosine from 1.0 at step 4 down to min_lr 0.1 at step 14 (max_iters), then 0.1 for any later step."""
    config = dict(lr=1.0, min_lr=0.1, warmup_iters=4, max_iters=14)
    hand = {0: 0.25, 1: 0.5, 3: 1.0, 4: 1.0,
            9: 0.55,                                   # halfway: 0.1 + 0.9 * (1 + cos(pi / 2)) / 2
            6: 0.1 + 0.45 * (1 + math.cos(math.pi / 5)),  # 2 of 10 decay steps
            13: 0.1 + 0.45 * (1 + math.cos(math.pi * 0.9)),
            14: 0.1, 15: 0.1, 100: 0.1}
    for step, lr in hand.items():
        assert pretrain.lr_at(step, config) == pytest.approx(lr, abs=1e-12), step


def gradients_at_step(run):
    """The gradients the optimizer sees at its (single) step during run(): the quantity DDP and gradient
    accumulation must get right. (Comparing weights after Adam's first step would amplify rounding noise in
    near-zero gradients, since that step is about lr * sign(gradient).)"""
    seen = {}
    original = torch.optim.AdamW.step

    def recording_step(optimizer, *args, **kwargs):
        # Under fp16 a fused AdamW may be handed gradients still multiplied by the loss scale, which it divides
        # out itself: GradScaler then sets optimizer.grad_scale (None once the gradients were unscaled).
        scale = getattr(optimizer, "grad_scale", None)
        scale = 1.0 if scale is None else scale
        seen.update({id(p): p.grad / scale for g in optimizer.param_groups for p in g["params"]})
        return original(optimizer, *args, **kwargs)

    torch.optim.AdamW.step = recording_step
    try:
        model = run()
    finally:
        torch.optim.AdamW.step = original
    assert seen, "the optimizer never stepped: no gradients were captured"
    return {name: seen[id(p)] for name, p in model.named_parameters() if id(p) in seen}


def assert_every_parameter_has_a_gradient(grads, model):
    """A comparison of two gradient dicts is only as good as what they hold: every parameter, none all zero."""
    assert set(grads) == {name for name, _ in model.named_parameters()}
    assert all(grad.abs().sum() > 0 for grad in grads.values()), [n for n, g in grads.items() if not g.any()]


def train_once(out_dir, batches, model=None, **overrides):
    """A fresh tiny model after pretrain.train on a list of batches (served by FixedBatches) or a batches object."""
    model = model or tiny_model()
    pretrain.train(loop_config(out_dir, **overrides), model, batches if hasattr(batches, "next") else FixedBatches(batches))
    return model


def uneven_halves():
    """The two halves of random_batch(4, 4): the first counts 32 targets, the second only 4."""
    long, short = split_batch(random_batch(4, 4), 2)
    short = dict(short, targets=short["targets"].clone())
    short["targets"][:, 2:] = -100                              # 2 counted targets per row, 4 in all
    return long, short


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    """Two micro-batches of 2 give the gradients of one batch of 4 (the aux loss is off: the Switch loss is
    defined per batch, so it is not additive over micro-batches)."""
    batch = random_batch(1, 4)
    big = gradients_at_step(lambda: train_once(tmp_path / "a", [batch]))
    small = gradients_at_step(lambda: train_once(tmp_path / "b", split_batch(batch, 2), grad_accum_steps=2,
                                                 batch_size=2))
    assert_every_parameter_has_a_gradient(big, tiny_model())
    for name, grad in big.items():
        torch.testing.assert_close(small[name], grad, atol=1e-7, rtol=1e-4, msg=name)


class CountingBatches(FixedBatches):
    """FixedBatches whose loss is the mean over counted targets, as CaptionBatches say (loss_counts)."""
    loss_counts = staticmethod(align.CaptionBatches.loss_counts)


def test_grad_accumulation_over_micro_batches_of_different_lengths_is_the_mean_over_all_targets(tmp_path):
    """Micro-batches that count different numbers of targets (captions and chats of different lengths, 32 and
    4 here): with batches that count their targets (CaptionBatches.loss_counts) the step's gradient and its
    logged loss are those of the mean over all 36 targets, one big batch's; second path: autograd on the
    concatenated batch from a fresh copy of the model. Batches that do not count (text windows, all equally
    long) get the mean of the micro-batch means, which here differs: a target of the short micro-batch would
    weigh 8 times as much as one of the long one."""
    batch = random_batch(4, 4)
    long, short = uneven_halves()
    model = tiny_model().train()
    names, params = [n for n, _ in model.named_parameters()], list(model.parameters())
    both = dict(tokens=batch["tokens"], targets=torch.cat([long["targets"], short["targets"]]))
    big_loss = model(**both)[1]                                 # the mean over all 36 targets
    per_target = dict(zip(names, torch.autograd.grad(big_loss, params)))
    mean_of_means = dict(zip(names, torch.autograd.grad((model(**long)[1] + model(**short)[1]) / 2, params)))
    assert (per_target["lm_head.weight"] - mean_of_means["lm_head.weight"]).norm() > 0.1 * per_target["lm_head.weight"].norm()
    logged = {}

    def run(batches, name):
        model = tiny_model()
        logged[name] = pretrain.train(loop_config(tmp_path / name, grad_accum_steps=2, batch_size=2), model,
                                      batches)[0][1]
        return model
    counted = gradients_at_step(lambda: run(CountingBatches([long, short]), "counted"))
    plain = gradients_at_step(lambda: run(FixedBatches([long, short]), "plain"))
    assert_every_parameter_has_a_gradient(counted, model)
    for name in names:
        torch.testing.assert_close(counted[name], per_target[name], atol=1e-7, rtol=1e-4, msg=name)
        torch.testing.assert_close(plain[name], mean_of_means[name], atol=1e-7, rtol=1e-4, msg=name)
    assert logged["counted"] == pytest.approx(big_loss.item(), rel=1e-6)


def assert_gradients_close(got, reference, tolerance):
    """Each parameter's gradient within `tolerance` of the reference's norm (elementwise tolerances do not
    suit bf16, whose error scales with each tensor's own magnitude)."""
    assert set(got) == set(reference)
    for name, grad in reference.items():
        assert (got[name] - grad).norm() <= tolerance * grad.norm(), (name, ((got[name] - grad).norm() / grad.norm()).item())


# Every token is routed to all 4 experts: the top-k choice has no ties for rounding to flip, so the mixed-
# precision runs below compute the same function as fp32 (a flipped choice would move an expert's gradient
# by the whole of one token's share).
ALL_EXPERTS = dict(top_k=TINY["n_experts"])


def test_bf16_autocast_matches_fp32_within_its_precision(tmp_path):
    """--dtype=bfloat16 on the CPU against float32, same model, same batch: the loss within 0.1 % and every
    parameter's gradient within 3 % of its norm (bf16 keeps 8 significant bits: 0.4 % per rounding; measured
    here: the loss 0.0001 % off, the gradients at most 1.1 %). It must also differ from fp32, or autocast was never on."""
    batch, losses = [random_batch(8, 4)], {}

    def run(dtype):
        model = tiny_model(**ALL_EXPERTS)
        losses[dtype] = pretrain.train(loop_config(tmp_path / dtype, dtype=dtype, aux_loss_coef=0.01), model,
                                       FixedBatches(batch))[0][1]
        return model
    fp32, bf16 = gradients_at_step(lambda: run("float32")), gradients_at_step(lambda: run("bfloat16"))
    assert_every_parameter_has_a_gradient(fp32, tiny_model())
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=1e-3)
    assert_gradients_close(bf16, fp32, 0.03)
    assert any((bf16[n] - fp32[n]).norm() > 1e-4 * fp32[n].norm() for n in fp32)  # bf16 really ran


def test_fp16_unscales_before_clipping(tmp_path):
    """--dtype=float16 with --grad_clip: the loss is scaled by 65536 for the backward pass, so the gradients
    must be unscaled before their norm is clipped. The clipped gradients the optimizer sees match fp32's
    (within fp16's precision), and clipping really acted: their norm is the clip, 0.05."""
    batch = [random_batch(9, 4)]
    grads = {dtype: gradients_at_step(lambda: train_once(tmp_path / dtype, batch, tiny_model(**ALL_EXPERTS),
                                                         dtype=dtype, grad_clip=0.05))
             for dtype in ("float32", "float16")}
    total_norm = lambda g: torch.stack([v.norm() for v in g.values()]).norm().item()
    assert total_norm(grads["float32"]) == pytest.approx(0.05, rel=1e-4)
    assert total_norm(grads["float16"]) == pytest.approx(0.05, rel=1e-3)
    assert_gradients_close(grads["float16"], grads["float32"], 0.03)


def test_logged_loss_is_the_steps_mean_over_its_micro_batches(tmp_path):
    """Two micro-batches of 2 log the loss of one batch of 4, not the last micro-batch's."""
    batch = random_batch(1, 4)
    whole = pretrain.train(loop_config(tmp_path / "a"), tiny_model(), FixedBatches([batch]))
    halves = pretrain.train(loop_config(tmp_path / "b", grad_accum_steps=2, batch_size=2), tiny_model(),
                            FixedBatches(split_batch(batch, 2)))
    assert halves[0][1] == pytest.approx(whole[0][1], rel=1e-5)


def _ddp_worker(rank, tmp, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    halves = split_batch(random_batch(2, 4), 2)
    grads = gradients_at_step(lambda: train_once(tmp, [halves[rank]]))
    if rank == 0:
        torch.save(grads, os.path.join(tmp, "ddp_grads.pt"))
    # Ranks whose batches count different numbers of targets (32 and 4): the step is the mean over all of
    # them (loss_shares sums the counts over the ranks), one big batch's.
    counted = CountingBatches([uneven_halves()[rank]])
    grads = gradients_at_step(lambda: train_once(os.path.join(tmp, "counted"), counted))
    if rank == 0:
        torch.save(grads, os.path.join(tmp, "ddp_counted_grads.pt"))
    # Resume for one more step: each rank must continue from its own data position (1 for rank 0; rank 1
    # starts at 10, so the ranks' states differ), not from rank 0's.
    batches = FixedBatches([halves[rank]])
    batches.position = 10 * rank
    pretrain.train(loop_config(tmp, max_iters=1), tiny_model(), batches)  # writes the checkpoint at step 1
    resumed = FixedBatches([halves[rank]])
    pretrain.train(loop_config(tmp, max_iters=2, resume=True), tiny_model(), resumed)
    torch.save(resumed.position, os.path.join(tmp, f"position{rank}.pt"))
    # max_seconds: rank 1's clock jumps 1000 s at every reading, so only rank 1 runs out of time; the ranks
    # must still stop at the same step (a rank that stops alone leaves the other waiting in an all-reduce).
    if rank == 1:
        ticks = iter(range(10**6))
        pretrain.time = types.SimpleNamespace(time=lambda: 1000.0 * next(ticks))
    timed = FixedBatches([halves[rank]])
    pretrain.train(loop_config(os.path.join(tmp, "timed"), max_iters=50, max_seconds=100.0), tiny_model(), timed)
    torch.save(timed.position, os.path.join(tmp, f"timed{rank}.pt"))
    # A NaN loss on rank 1 alone must stop both ranks, each with the error (not rank 1 alone, leaving rank 0
    # waiting for it).
    model = tiny_model()
    if rank == 1:
        model.lm_head.register_forward_hook(lambda module, inputs, output: output * float("nan"))
    try:
        pretrain.train(loop_config(os.path.join(tmp, "nan"), max_iters=5), model, FixedBatches([halves[rank]]))
    except pretrain.TrainingError as error:
        torch.save(str(error), os.path.join(tmp, f"nan{rank}.pt"))
    torch.distributed.destroy_process_group()


def free_port():
    """A TCP port no process listens on now: the one the system picks for a socket bound to port 0."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_one_process(tmp_path):
    port = free_port()
    workers = torch.multiprocessing.spawn(_ddp_worker, args=(str(tmp_path), port), nprocs=2, join=False)
    deadline = time.time() + 120
    while not workers.join(timeout=5):  # a rank waiting for another that stopped would otherwise hang CI
        if time.time() > deadline:
            for process in workers.processes:
                process.kill()
            pytest.fail("the DDP workers hung: the ranks did not stop at the same step")
    single = gradients_at_step(lambda: train_once(tmp_path / "single", [random_batch(2, 4)]))
    ddp = torch.load(tmp_path / "ddp_grads.pt", weights_only=True)
    assert_every_parameter_has_a_gradient(single, tiny_model())
    assert set(ddp) == set(single)
    for name, grad in single.items():
        torch.testing.assert_close(ddp[name], grad, atol=1e-7, rtol=1e-4, msg=name)
    long, short = uneven_halves()
    both = dict(tokens=torch.cat([long["tokens"], short["tokens"]]), targets=torch.cat([long["targets"], short["targets"]]))
    single = gradients_at_step(lambda: train_once(tmp_path / "single_counted", [both]))
    ddp = torch.load(tmp_path / "ddp_counted_grads.pt", weights_only=True)
    for name, grad in single.items():
        torch.testing.assert_close(ddp[name], grad, atol=1e-7, rtol=1e-4, msg=name)
    positions = [torch.load(tmp_path / f"position{rank}.pt") for rank in (0, 1)]
    assert positions == [2, 12]  # each rank's saved position + the one step after resuming
    assert [torch.load(tmp_path / f"timed{rank}.pt") for rank in (0, 1)] == [1, 1]  # both stopped after step 1
    assert all(torch.load(tmp_path / f"nan{rank}.pt").startswith("loss is nan at step 0") for rank in (0, 1))


def test_aligned_windows_start_every_chunk_at_a_document_and_are_copies_of_the_stream(tiny_data):
    """With piece=16 each window of 32 is two pieces of the stream that each begin at a document's first token,
    its targets the same pieces shifted by one (found by brute force among every document start); with
    piece=0 the windows are nanoGPT's, drawn anywhere with the same generator calls as before (a reference
    draw); a piece that does not divide the context makes the window one piece."""
    stream = np.memmap(os.path.join(tiny_data["data_dir"], "train.bin"), dtype=np.uint16, mode="r")
    starts = np.flatnonzero(stream == pretrain.BOS_ID)
    def where(tokens, targets):
        """The document starts s whose stream[s:s+n] is tokens and stream[s+1:s+n+1] targets."""
        n = len(tokens)
        return [s for s in starts if np.array_equal(stream[s:s + n], tokens) and
                np.array_equal(stream[s + 1:s + n + 1], targets)]
    cpu = torch.device("cpu")
    for piece, context in ((16, 32), (24, 32)):
        batch = pretrain.TextBatches(tiny_data["data_dir"], context, 4, cpu, seed=3, piece=piece).next()
        length = piece if context % piece == 0 else context
        for row in range(4):
            for j in range(0, context, length):
                tokens, targets = batch["tokens"][row, j:j + length], batch["targets"][row, j:j + length]
                assert tokens[0] == pretrain.BOS_ID and where(tokens.numpy(), targets.numpy())
    anywhere = pretrain.TextBatches(tiny_data["data_dir"], 32, 4, cpu, seed=3).next()
    drawn = torch.randint(len(stream) - 33, (4,), generator=torch.Generator().manual_seed(3)).tolist()
    windows = torch.tensor(np.stack([stream[s:s + 33] for s in drawn]).astype(np.int64))
    assert torch.equal(anywhere["tokens"], windows[:, :-1]) and torch.equal(anywhere["targets"], windows[:, 1:])
    assert (anywhere["tokens"][:, 0] != pretrain.BOS_ID).any()  # anywhere: not (only) at document starts


class Killed(Exception):
    pass


class DiesAfter(pretrain.TextBatches):
    """TextBatches whose process 'dies' when asked for batch number `limit`."""

    def __init__(self, limit, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.limit, self.served = limit, 0

    def next(self, split="train", generator=None):
        self.served += split == "train" and generator is None
        if self.served > self.limit:
            raise Killed()
        return super().next(split, generator)


def test_resume_continues_the_same_loss_curve(tiny_data, tmp_path):
    cfg = dict(loop_config(tmp_path, **{k: tiny_data[k] for k in ("vocab_size", "data_dir")}),
               max_iters=12, eval_interval=4, eval_iters=2, context=32, batch_size=4, aux_loss_coef=0.01,
               grad_clip=1.0, warmup_iters=3, min_lr=1e-3)
    make_batches = lambda cls, *a: cls(*a, tiny_data["data_dir"], 32, 4, torch.device("cpu"), 5, 0, 2, piece=16)
    whole = pretrain.train(dict(cfg, out_dir=str(tmp_path / "whole")), tiny_model(vocab_size=320),
                           make_batches(pretrain.TextBatches))
    with pytest.raises(Killed):  # dies during step 7, after the checkpoint at step 4
        pretrain.train(dict(cfg, out_dir=str(tmp_path / "cut")), tiny_model(vocab_size=320),
                       make_batches(DiesAfter, 7))
    resumed = pretrain.train(dict(cfg, out_dir=str(tmp_path / "cut"), resume=True), tiny_model(seed=9, vocab_size=320),
                             make_batches(pretrain.TextBatches))
    assert [s for s, _ in resumed] == list(range(4, 12))
    assert [l for _, l in resumed] == pytest.approx([l for _, l in whole[4:]], rel=1e-5)


def test_resume_takes_this_runs_optimizer_settings_or_fails_cleanly(tmp_path):
    batches = lambda: FixedBatches([random_batch(0, 4)])
    pretrain.train(loop_config(tmp_path, weight_decay=0.1), tiny_model(), batches())
    pretrain.train(loop_config(tmp_path, max_iters=2, weight_decay=0.05, beta2=0.99, resume=True), tiny_model(),
                   batches())
    groups = torch.load(tmp_path / "ckpt.pt", weights_only=True)["optimizer"]["param_groups"]
    assert {(g["weight_decay"], tuple(g["betas"])) for g in groups} == {(0.05, (0.9, 0.99)), (0.0, (0.9, 0.99))}
    with pytest.raises(pretrain.TrainingError, match="--weight_decay"):  # one parameter group instead of two
        pretrain.train(loop_config(tmp_path, max_iters=3, weight_decay=0.0, resume=True), tiny_model(), batches())


def test_resume_by_another_number_of_processes_restarts_the_data_and_keeps_the_best_val_loss(tmp_path, capsys):
    """A checkpoint saved by 2 processes, resumed by 1: the data states cannot be shared out, so the run says
    so and its batches start afresh (position 0, then 1 after one step), not from rank 0's saved position 7.
    The best validation loss so far comes from the checkpoint (0.125, better than this run reaches)."""
    pretrain.train(loop_config(tmp_path), tiny_model(), FixedBatches([random_batch(0, 4)]))
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    state.update(batches=[{"position": 7}, {"position": 17}], best_val_loss=0.125)  # as two ranks saved it
    torch.save(state, tmp_path / "ckpt.pt")
    capsys.readouterr()
    batches = FixedBatches([random_batch(0, 4)])
    pretrain.train(loop_config(tmp_path, max_iters=2, resume=True), tiny_model(), batches)
    assert "was saved by 2 process(es), this run has 1: every rank restarts its data order" in capsys.readouterr().out
    assert batches.position == 1
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert saved["step"] == 2 and saved["best_val_loss"] == 0.125 and saved["val_loss"] > 0.125


def test_resume_keeps_the_fp16_loss_scale(tmp_path):
    batches = lambda: FixedBatches([random_batch(0, 4)])
    pretrain.train(loop_config(tmp_path, dtype="float16"), tiny_model(), batches())
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    state["scaler"]["scale"] = 1024.0  # as if it had backed off from 65536 after overflows
    torch.save(state, tmp_path / "ckpt.pt")
    pretrain.train(loop_config(tmp_path, dtype="float16", max_iters=2, resume=True), tiny_model(), batches())
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["scaler"]["scale"] == 1024.0


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    pretrain.save_checkpoint(path, {"step": 1, "w": torch.ones(3)})

    def crash_mid_write(obj, f):
        with open(f, "wb") as handle:
            handle.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(KeyboardInterrupt):
        pretrain.save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    state = pretrain.load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path):
    model = tiny_model().train()
    calls = {"n": 0}

    def poison(module, inputs, output):  # the 4th training forward produces NaN logits
        calls["n"] += module.training
        return output * float("nan") if calls["n"] == 4 else output

    model.lm_head.register_forward_hook(poison)
    with pytest.raises(pretrain.TrainingError, match="loss is nan at step 3"):
        pretrain.train(loop_config(tmp_path, max_iters=10, eval_interval=2), model, FixedBatches([random_batch(0, 2)]))
    state = pretrain.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())


# ----------------------------------------------------------------------------------------------------------
# Command lines and bad input: one clear line, a non-zero exit, no traceback, nothing overwritten
# ----------------------------------------------------------------------------------------------------------

def run(*args, env=None):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, **(env or {})))


def assert_clean_error(result, *phrases):
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0, result.stdout
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    args = ["pretrain.py", f"--data_dir={tiny_data['data_dir']}", "--vocab_size=320", "--shapes_docs=3000",
            f"--out_dir={out}", "--dim=32", "--n_layers=4", "--n_heads=4", "--n_kv_heads=2", "--ffn_hidden=48",
            "--moe_hidden=24", "--context=64", "--attn_chunk=16", "--max_iters=30", "--eval_interval=30",
            "--eval_iters=2", "--warmup_iters=5", "--batch_size=8", "--device=cpu"]
    result = run(*args)
    assert result.returncode == 0, result.stderr
    assert "eval step 30: val loss" in result.stdout
    # The run's log beside its checkpoint holds exactly the step and eval lines it printed.
    printed = [line for line in result.stdout.splitlines() if line.startswith(("step ", "eval step "))]
    assert (out / "log.txt").read_text().splitlines() == printed and len(printed) >= 2
    return out / "ckpt.pt", args


def test_sample_cli_and_its_bad_input(tiny_ckpt, tmp_path):
    ckpt, _ = tiny_ckpt
    ok = run("sample.py", f"--ckpt={ckpt}", "--prompt", "a red", "--max_new_tokens=5", "--device=cpu")
    assert ok.returncode == 0 and ok.stdout.startswith("a red"), ok.stderr
    assert_clean_error(run("sample.py", f"--ckpt={tmp_path / 'none.pt'}", "--prompt=a"), "python pretrain.py")
    assert_clean_error(run("sample.py", f"--ckpt={ckpt}", "--prompt="), "prompt is empty")
    assert_clean_error(run("sample.py", f"--ckpt={ckpt}", "--prompt=a <|image|>"), "special token")
    assert_clean_error(run("sample.py", f"--ckpt={ckpt}", "--prompt=" + "red " * 100), "context is 64")
    assert_clean_error(run("sample.py", "--colour=red"), "unknown config key --colour")
    assert_clean_error(run("sample.py", "--max_new_tokens=many"), "expects an integer")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert_clean_error(run("sample.py", f"--ckpt={tmp_path / 'junk.pt'}", "--prompt=a"), "not a readable checkpoint")
    state = torch.load(ckpt, weights_only=True)
    state["config"] = dict(state["config"], dim=48)
    torch.save(state, tmp_path / "other.pt")
    assert_clean_error(run("sample.py", f"--ckpt={tmp_path / 'other.pt'}", "--prompt=a"), "different model config")


def test_resume_with_another_config_fails_cleanly_and_keeps_the_checkpoint(tiny_ckpt):
    ckpt, args = tiny_ckpt
    before = ckpt.read_bytes()
    assert_clean_error(run(*args, "--resume=True", "--dim=48", "--max_iters=40"), "different model config")
    assert ckpt.read_bytes() == before


def test_data_bad_input(tmp_path):
    target = tmp_path / "prepared"
    assert_clean_error(run("pretrain.py", "--text_source=hf", f"--data_dir={target}",
                           env={"HF_HUB_OFFLINE": "1"}), "cannot reach the Hugging Face Hub", "--text_source=")
    (tmp_path / "empty.txt").write_text("")
    assert_clean_error(run("pretrain.py", f"--text_source={tmp_path / 'empty.txt'}", f"--data_dir={target}"),
                       "empty")
    assert_clean_error(run("pretrain.py", f"--text_source={tmp_path / 'missing.txt'}", f"--data_dir={target}"),
                       "not found")
    assert not target.exists()


# ----------------------------------------------------------------------------------------------------------
# Export to Hugging Face transformers: an implementation nobody here wrote must give the same logits
# ----------------------------------------------------------------------------------------------------------

def _random_llama4_checkpoint(tmp_path, **overrides):
    """A tiny model with every feature on (dense and MoE layers, RoPE and NoPE layers, several attention chunks)
    and *all* weights random, norms included, saved as a phase-1 checkpoint with its tokenizer."""
    config = dict(CONFIG, vocab_size=320, dim=64, n_layers=6, n_heads=4, n_kv_heads=2, ffn_hidden=96,
                  moe_hidden=48, n_experts=4, top_k=2, moe_every=2, nope_every=3, attn_chunk=8, context=64)
    config.update(overrides)
    tokenizer = train_tokenizer(["a red circle is left of a blue square.", "Héllo wörld, café! 漢字 🙂🚀",
                                 "the big green triangle is at the top."] * 10, config["vocab_size"])
    torch.manual_seed(0)
    model = Transformer(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0, 0.1)
    path = tmp_path / "ckpt.pt"
    torch.save(dict(model=model.state_dict(), config=config, tokenizer=tokenizer.to_str(), step=0), path)
    return model, tokenizer, path


def _check_against_transformers(model, out_dir, lengths=(40, 37), prompt_len=13, new_tokens=20):
    """Logits of a full forward, greedy generation, and the logits of transformers' cached decoding steps
    all match our model. Returns the loaded transformers model."""
    from transformers import AutoModelForCausalLM
    hf_model, info = AutoModelForCausalLM.from_pretrained(out_dir, output_loading_info=True)
    hf_model.eval()
    assert type(hf_model).__name__ == "Llama4ForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for length in lengths:  # several chunks; a whole number of chunks and not (two code paths in Attention)
            tokens = torch.randint(0, model.config["vocab_size"], (3, length), generator=generator)
            ours, _, _ = model(tokens)
            theirs = hf_model(tokens).logits
            assert (ours - theirs).abs().max().item() <= 1e-4
    # Greedy decoding with each side's KV cache, past several chunk boundaries (transformers keeps a sliding
    # window cache of attention_chunk_size on the chunked layers); no stop token on either side.
    prompt = tokens[:1, :prompt_len]
    ours_new = pretrain.generate(model, prompt, new_tokens, stop_ids=())
    out = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                            do_sample=False, eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    assert out.sequences[:, prompt_len:].tolist() == ours_new.tolist()
    with torch.no_grad():
        full, _, _ = model(out.sequences[:, :-1])                     # recompute the whole sequence at once
    assert (torch.stack(out.logits, dim=1) - full[:, prompt_len - 1:]).abs().max().item() <= 1e-4
    # With the exported generation_config, transformers stops where our generate stops.
    stopped = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                do_sample=False)
    assert stopped[:, prompt_len:].tolist() == pretrain.generate(model, prompt, new_tokens).tolist()
    return hf_model


def test_export_hf_matches_transformers(tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer
    model, tokenizer, ckpt = _random_llama4_checkpoint(tmp_path)
    out_dir = tmp_path / "hf"
    export_hf.export(str(ckpt), str(out_dir))
    hf_model = _check_against_transformers(model, out_dir)
    c = hf_model.config
    assert (c.moe_layers, c.no_rope_layers, c.attention_chunk_size) == ([1, 3, 5], [1, 1, 0, 1, 1, 0], 8)
    assert (c.intermediate_size, c.intermediate_size_mlp, c.max_position_embeddings) == (48, 96, 64)
    assert not c.tie_word_embeddings and c.rope_parameters["rope_theta"] == CONFIG["rope_theta"]

    hf_tokenizer = AutoTokenizer.from_pretrained(out_dir)
    assert (hf_tokenizer.bos_token, hf_tokenizer.eos_token, hf_tokenizer.pad_token) == tuple(SPECIAL_TOKENS[:3])
    assert (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id) == (0, 1, 2)
    texts = ["a red circle", "Héllo wörld, café, naïve, Ångström", "漢字かな交じり文", "emoji 🙂🚀👩‍👩‍👧",
             "  two  spaces,\ttab\t\tand\n\nnewlines   ", " leading space", "", "".join(SPECIAL_TOKENS),
             "<|begin_of_text|>a document<|end_of_text|>", "x<|image|>y <|user|> q <|assistant|> a<|eot|>"]
    for text in texts:
        ours = pretrain.encode(tokenizer, text)
        assert hf_tokenizer(text, add_special_tokens=False).input_ids == ours, text
        assert hf_tokenizer(text).input_ids == [BOS_ID] + ours, text  # by default, as sample.py prompts
        assert hf_tokenizer.decode(ours) == tokenizer.decode(ours, skip_special_tokens=False), text
        assert hf_tokenizer.decode(ours, skip_special_tokens=True) == tokenizer.decode(ours), text


def test_export_hf_nope_temperature(tmp_path):
    """The NoPE layers' query temperature is 1 below position floor_scale - 1; with floor_scale=4 it is not,
    and the exported model must still match."""
    pytest.importorskip("transformers")
    model, _, ckpt = _random_llama4_checkpoint(tmp_path, n_layers=4, nope_every=2, floor_scale=4)
    tokens = torch.randint(0, model.config["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(2))
    untuned = pretrain.Transformer(dict(model.config, floor_scale=8192)).eval()
    untuned.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (untuned(tokens)[0] - model(tokens)[0]).abs().max().item() > 0.05  # the temperature matters here
    export_hf.export(str(ckpt), str(tmp_path / "hf"))
    hf_model = _check_against_transformers(model, tmp_path / "hf")
    assert (hf_model.config.floor_scale, hf_model.config.attn_scale) == (4, CONFIG["attn_scale"])


def test_export_hf_bad_input(tmp_path):
    """A missing checkpoint or an unusable output folder: one error line, non-zero exit, nothing written."""
    root = os.path.dirname(os.path.abspath(pretrain.__file__))
    result = subprocess.run([sys.executable, "export_hf.py", str(tmp_path / "missing.pt"), str(tmp_path / "hf")],
                            cwd=root, capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error: no checkpoint at") and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "hf").exists()
    _, _, ckpt = _random_llama4_checkpoint(tmp_path)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(export_hf.ExportError, match="not empty"):
        export_hf.export(str(ckpt), str(tmp_path / "full"))
    with pytest.raises(export_hf.ExportError, match="is a file"):
        export_hf.export(str(ckpt), str(ckpt))
    assert os.listdir(tmp_path / "full") == ["keep.txt"] and sorted(os.listdir(tmp_path)) == ["ckpt.pt", "full"]


def test_export_hf_trained_checkpoint(tiny_ckpt, tiny_data, tmp_path):
    """The same check on a checkpoint trained on Shapes World, over real validation text."""
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM
    ckpt, _ = tiny_ckpt
    model, _, _ = pretrain.model_from_checkpoint(str(ckpt))
    export_hf.export(str(ckpt), str(tmp_path / "hf"))
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    val = np.fromfile(os.path.join(tiny_data["data_dir"], "val.bin"), dtype=np.uint16)[:4 * 64]
    tokens = torch.from_numpy(val.astype(np.int64)).view(4, 64)
    with torch.no_grad():
        assert (model(tokens)[0] - hf_model(tokens).logits).abs().max().item() <= 1e-4
    prompt = tokens[:1, :10]
    hf_ids = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False,
                               eos_token_id=None)
    assert hf_ids[:, 10:].tolist() == generate(model, prompt, 20, stop_ids=()).tolist()


# ----------------------------------------------------------------------------------------------------------
# Phase 2: the VLM glue, frozen parts, cached features, captioning, image input
# ----------------------------------------------------------------------------------------------------------

VISION = dict(vision_model="shapes_vit", image_size=32, vision_layer=-1, pixel_shuffle=2, projector_hidden=40)


def tiny_vlm(seed=0):
    """A tiny LLM + a tiny random 32 px ViT (16 patches -> 4 image tokens) + projector."""
    llm = tiny_model(seed, context=64)
    torch.manual_seed(seed)
    vit = align.build_vision_transformer(dict(TINY, **VISION))
    vlm = align.VLM(llm, vit, dict(TINY, **VISION))
    llm.requires_grad_(False)
    return vlm.eval()


def test_encoder_pretraining_gives_every_trainable_parameter_a_gradient():
    """DDP (torchrun) stops with an error when a trainable parameter gets no gradient; torchvision's unused
    ImageNet head used to be one."""
    classifier = shapes_encoder.PatchClassifier(align.build_vision_transformer(dict(TINY, **VISION)))
    scenes = shapes_world.make_scenes("train", 2, seed=0)
    transform = align.image_transform(dict(TINY, **VISION))
    images = torch.stack([transform(shapes_world.render(s, 32)) for s in scenes])
    labels = torch.tensor([shapes_encoder.patch_labels(s, 4) for s in scenes])
    classifier(images, labels)[1].backward()
    assert all(p.grad is not None for p in classifier.parameters() if p.requires_grad)


def test_vlm_rejects_a_vision_layer_or_image_size_that_cannot_work():
    vit = align.build_vision_transformer(dict(TINY, **VISION))
    for layer in (0, 1, -len(vit.encoder.layers) - 1):
        with pytest.raises(ConfigError, match="vision_layer"):
            align.VLM(tiny_model(context=64), vit, dict(TINY, **dict(VISION, vision_layer=layer)))
    with pytest.raises(ConfigError, match="too many for the LLM's context of 16"):
        align.VLM(tiny_model(context=16), vit, dict(TINY, **dict(VISION, pixel_shuffle=1)))  # 16 image tokens


def test_pixel_shuffle_is_a_pure_permutation():
    x = torch.arange(2 * 16 * 3).float().view(2, 16, 3)  # a 4 x 4 grid of 3-channel tokens
    y = align.pixel_shuffle(x, 2)
    assert y.shape == (2, 4, 12)
    assert torch.equal(y.flatten().sort().values, x.flatten().sort().values)
    for b in range(2):  # brute force: output token (R, C) holds input tokens (2R + dy, 2C + dx) in dy, dx order
        for R in range(2):
            for C in range(2):
                expect = torch.cat([x[b, (2 * R + dy) * 4 + 2 * C + dx] for dy in range(2) for dx in range(2)])
                assert torch.equal(y[b, R * 2 + C], expect)


def test_image_tokens_replace_placeholders_and_labels_mask_image_and_padding():
    vlm = tiny_vlm()
    tokens, targets = align.caption_sequence([10, 11, 12], vlm.n_image_tokens)
    n = vlm.n_image_tokens
    assert tokens == [BOS_ID] + [IMAGE_ID] * n + [10, 11, 12]
    assert targets == [-100] * n + [10, 11, 12, EOS_ID]  # the caption and its end token are the targets
    features = torch.randn(2, 16, 128)
    batch = torch.tensor([tokens, [BOS_ID] + [IMAGE_ID] * n + [20, PAD_ID, PAD_ID]])
    embeds = vlm.embed(batch, features)
    projected = vlm.projector(align.pixel_shuffle(features, 2))
    for row in range(2):
        torch.testing.assert_close(embeds[row, 1:1 + n], projected[row])
        torch.testing.assert_close(embeds[row, 0], vlm.llm.embed_tokens.weight[BOS_ID])
        torch.testing.assert_close(embeds[row, 1 + n:], vlm.llm.embed_tokens(batch[row, 1 + n:]))


def caption_config(tmp_path, **overrides):
    base = dict(loop_config(tmp_path), **VISION, caption_source="shapes", train_images=40, eval_images=8,
                eval_iters=1, batch_size=4, max_caption_tokens=40, cache_features=True, seed=0)
    return dict(base, **overrides)


def tokenizer_for_tests():
    docs = [shapes_world.caption(s) for s in shapes_world.make_scenes("train", 300)]
    return train_tokenizer(docs, TINY["vocab_size"] + 200)


def test_frozen_parts_get_no_gradient_and_no_optimizer_state(tmp_path):
    vlm = tiny_vlm()
    vlm.llm = tiny_model(vocab_size=264, context=64)
    vlm.llm.requires_grad_(False)
    batches = align.CaptionBatches(vlm, tokenizer_for_tests(), caption_config(tmp_path), torch.device("cpu"))
    before = {k: v.clone() for k, v in vlm.state_dict().items()}
    pretrain.train(caption_config(tmp_path, max_iters=2), vlm, batches)
    after = vlm.state_dict()
    for name, value in after.items():
        changed = not torch.equal(before[name], value)
        assert changed == name.startswith("projector."), name
        assert (vlm.get_parameter(name).grad is None) if name in dict(vlm.named_parameters()) else True
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)["optimizer"]["state"]
    assert len(state) == len(list(vlm.projector.parameters()))


def test_batches_by_length_are_the_same_random_draw_cut_into_neighbours_and_resume_exactly(tmp_path):
    """batches_by_length draws the rows one random batch at a time would (the same generator calls give the
    same multiset), and cuts them so that every batch holds neighbours in length: sorted by their shortest
    row, no batch's longest row is longer than the next batch's shortest. A CaptionBatches saved between two
    batches of a group and loaded into a fresh one gives the same batches after as the one that went on."""
    lengths = [random.Random(i).randint(5, 90) for i in range(300)]
    rows = align.batches_by_length(lengths, 8, 6, torch.Generator().manual_seed(3))
    assert [len(batch) for batch in rows] == [8] * 6
    drawn = torch.randint(300, (48,), generator=torch.Generator().manual_seed(3)).tolist()
    assert sorted(row for batch in rows for row in batch) == sorted(drawn)
    spans = sorted((min(lengths[r] for r in batch), max(lengths[r] for r in batch)) for batch in rows)
    assert all(spans[i][1] <= spans[i + 1][0] for i in range(5))
    padded = lambda batches: sum(len(b) * max(lengths[r] for r in b) for b in batches)
    assert padded(rows) < padded([drawn[i:i + 8] for i in range(0, 48, 8)])

    vlm = tiny_vlm()
    vlm.llm = tiny_model(vocab_size=264, context=64)
    config = caption_config(tmp_path, group_by_length=4)
    batches = align.CaptionBatches(vlm, tokenizer_for_tests(), config, torch.device("cpu"))
    batches.next("train"), batches.next("train")
    state = copy.deepcopy(batches.state_dict())
    later = [batches.next("train") for _ in range(5)]  # the rest of the first group and into the second
    again = align.CaptionBatches(vlm, tokenizer_for_tests(), config, torch.device("cpu"))
    again.load_state_dict(state)
    for a, b in zip(later, [again.next("train") for _ in range(5)]):
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["features"], b["features"])


def test_cached_features_are_the_features_computed_on_the_fly_and_padding_is_masked(tmp_path):
    """A batch from the float16 cache holds, row for row, the features the encoder computes from that row's
    pixels now: equal to float16's rounding (2e-3 at values up to 3), while the features of two different
    images differ by more than 1, so a cache row shifted by one image cannot pass. Rows of different lengths
    are right-padded with <|pad|> and their padding is never a target (-100)."""
    vlm = tiny_vlm()
    vlm.llm = tiny_model(vocab_size=264, context=64)
    tokenizer = tokenizer_for_tests()
    cached = align.CaptionBatches(vlm, tokenizer, caption_config(tmp_path), torch.device("cpu"))
    live = align.CaptionBatches(vlm, tokenizer, caption_config(tmp_path, cache_features=False), torch.device("cpu"))
    lengths = [len(tokens) for tokens, _ in cached.sequences["train"]]
    rows = [lengths.index(min(lengths)), 5, 7, lengths.index(max(lengths))]
    a, b = cached.batch("train", rows), live.batch("train", rows)
    assert "features" in a and "images" in b
    computed = vlm.image_features(b["images"])
    torch.testing.assert_close(a["features"].float(), computed, atol=2e-3, rtol=1e-3)
    assert min((computed[i] - computed[j]).abs().max() for i in range(4) for j in range(i)) > 1.0
    with torch.no_grad():
        torch.testing.assert_close(vlm(**a)[1], vlm(**b)[1], atol=2e-3, rtol=1e-3)
    assert min(lengths) < max(lengths)
    for i, row in enumerate(rows):
        tokens, targets = cached.sequences["train"][row]
        n = len(tokens)
        assert a["tokens"][i, :n].tolist() == tokens and a["targets"][i, :n].tolist() == targets
        assert (a["tokens"][i, n:] == PAD_ID).all() and (a["targets"][i, n:] == -100).all()


def test_feature_cache_cut_short_while_rewriting_is_not_reused(tmp_path):
    vlm, path = tiny_vlm(), str(tmp_path / "features.npy")
    transform = align.image_transform(dict(TINY, **VISION))
    images = [lambda s=s: shapes_world.render(s, 32) for s in shapes_world.make_scenes("train", 4, seed=0)]
    first = np.array(align.compute_features(vlm, images, transform, path, torch.device("cpu"), "A"))

    def dies():
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):  # source B: the rewrite dies after its first image
        align.compute_features(vlm, images[:1] + [dies] * 3, transform, path, torch.device("cpu"), "B")
    again = align.compute_features(vlm, images, transform, path, torch.device("cpu"), "A")
    np.testing.assert_array_equal(np.array(again), first)  # recomputed, not the half-written file


def greedy_by_full_recompute(vlm, prefix, features, steps):
    """Greedy decoding that re-runs the whole sequence every step: the prefix through vlm.embed, generated
    tokens as plain text embeddings (a generated id is text even if it happens to be <|image|>)."""
    generated = []
    with torch.no_grad():
        for _ in range(steps):
            embeds = torch.cat([vlm.embed(prefix[None], features[None]),
                                vlm.llm.embed_tokens(torch.tensor([generated], dtype=torch.long))], dim=1)
            generated.append(vlm.llm(embeds=embeds)[0][0, -1].argmax().item())
            if generated[-1] in (EOS_ID, EOT_ID):
                return generated[:-1]
    return generated


def test_kv_cache_captioning_equals_full_recompute():
    vlm = tiny_vlm()
    features = torch.randn(3, 16, 128)
    got = align.caption_images(vlm, features, 12)
    prefix = torch.tensor([BOS_ID] + [IMAGE_ID] * vlm.n_image_tokens)
    for row in range(3):
        assert got[row] == greedy_by_full_recompute(vlm, prefix, features[row], 12)


def test_local_vit_b_16_weights_load_through_a_path(tmp_path):
    from torchvision.models import vit_b_16
    torch.manual_seed(3)
    reference = vit_b_16()
    torch.save(reference.state_dict(), tmp_path / "vit.pth")
    vit = align.build_vision_transformer(dict(CONFIG, vision_model="vit_b_16"))
    align.load_vision_weights(vit, dict(CONFIG, vision_model="vit_b_16", vision_weights=str(tmp_path / "vit.pth")),
                              torch.device("cpu"))
    for name, value in reference.state_dict().items():
        assert torch.equal(vit.state_dict()[name], value), name
    with pytest.raises(DataError, match="does not fit"):
        align.load_vision_weights(align.build_vision_transformer(dict(CONFIG, **VISION)),
                                  dict(CONFIG, **VISION, vision_weights=str(tmp_path / "vit.pth")), torch.device("cpu"))


def write_images(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    scenes = shapes_world.make_scenes("train", n, seed=4)
    for i, scene in enumerate(scenes):
        shapes_world.render(scene, 32).save(folder / f"img{i}.png")
    return scenes


def solid_colour(i):
    """Image i's colour: distinct for each i < 64, so that an image tells which caption belongs to it."""
    return (4 * i, 255 - 4 * i, 37 * i % 256)


def test_coco_parquet_and_imagefolder_load_offline(tmp_path, monkeypatch):
    """Local COCO-style parquet (two captions of each image, a row each) and an image folder with
    metadata.jsonl: every pair holds its own image. Image i is a solid colour and its captions name i, so
    each pair is checked by looking at its pixels."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
    from data.captions import caption_set
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "imgs").mkdir()
    for i in range(60):
        Image.new("RGB", (32, 32), solid_colour(i)).save(tmp_path / "imgs" / f"img{i}.png")

    def assert_each_caption_has_its_image(dataset):
        for index, text in dataset.pairs:
            number = int(text.split()[1])  # "picture 12 (1)"
            assert dataset.images[index]().getpixel((5, 5)) == solid_colour(number), text
    rows = [dict(image={"bytes": (tmp_path / "imgs" / f"img{i}.png").read_bytes(), "path": f"img{i}.png"},
                 filename=f"img{i}.png", cocoid=i, caption=f"picture {i} ({k})")
            for i in range(60) for k in range(2)]  # two captions per image, as COCO has five
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "coco.parquet")
    train_set = caption_set(dict(CONFIG, caption_source=str(tmp_path / "coco.parquet")), "train")
    val_set = caption_set(dict(CONFIG, caption_source=str(tmp_path / "coco.parquet")), "val")
    assert (len(train_set.images), len(train_set.pairs), len(val_set.images), len(val_set.pairs)) == (59, 118, 1, 2)
    assert_each_caption_has_its_image(train_set)
    assert_each_caption_has_its_image(val_set)
    assert train_set.images[1]().size == (32, 32)
    with open(tmp_path / "imgs" / "metadata.jsonl", "w") as f:
        for i in range(60):
            f.write(json.dumps({"file_name": f"img{i}.png", "text": f"picture {i}"}) + "\n")
    for split, n in (("train", 59), ("val", 1)):
        folder_set = caption_set(dict(CONFIG, caption_source=str(tmp_path / "imgs")), split)
        assert len(folder_set.pairs) == n
        assert_each_caption_has_its_image(folder_set)


# ----------------------------------------------------------------------------------------------------------
# Phase 3: the chat format, trainable parts, LLaVA-format data
# ----------------------------------------------------------------------------------------------------------

def test_two_turn_conversation_renders_as_written_by_hand():
    tokenizer = tokenizer_for_tests()
    e = lambda text: pretrain.encode(tokenizer, text)
    turns = [("<image>\nwhat color is it?", "red"), ("how many shapes are there?", "two")]
    tokens, targets = instruct.render_conversation(turns, tokenizer, 4, context=256)
    expected = ([BOS_ID, USER_ID] + [IMAGE_ID] * 4 + e("what color is it?") + [EOT_ID, ASSISTANT_ID] + e("red")
                + [EOT_ID, USER_ID] + e("how many shapes are there?") + [EOT_ID, ASSISTANT_ID] + e("two") + [EOT_ID])
    assert tokens == expected[:-1]
    answers = answer_positions_of(expected)
    assert [i for i, t in enumerate(targets) if t != -100] == [p - 1 for p in sorted(answers)]
    assert all(t == -100 or t == expected[i + 1] for i, t in enumerate(targets))
    labelled = [t for t in targets if t != -100]
    assert labelled == e("red") + [EOT_ID] + e("two") + [EOT_ID]  # the answers and their end markers, nothing else


def answer_positions_of(sequence):
    """Positions inside assistant replies, found by walking the markers (an independent reading)."""
    inside, positions = False, set()
    for i, token in enumerate(sequence):
        if token == ASSISTANT_ID:
            inside = True
        elif inside:
            positions.add(i)
            inside = token != EOT_ID
    return positions


def question_type(question):
    """The type of a Shapes World question, read from its wording (not from shapes_world's generators)."""
    for prefix, qtype in (("is there", "exists"), ("can you see", "exists"), ("where is", "position"),
                          ("in which part", "position"), ("how many", "count"), ("what color", "color"),
                          ("what is the color", "color"), ("what shape", "kind"), ("what kind", "kind"),
                          ("what is the", "kind")):
        if question.startswith(prefix):
            return qtype
    raise AssertionError(f"unknown question: {question!r}")


def test_shapes_conversations_ask_every_question_of_their_scene():
    """Each scene's conversation asks every type once (position only where some shape has a unique name),
    the caption request at most once and answered with the scene's caption, and the image in the first turn."""
    data = instruct.shapes_conversations("train", 300, 0, 48)
    with_caption = 0
    for (row, turns), scene in zip(data.pairs, data.scenes):
        assert data.scenes[row] is scene and turns[0][0].startswith(instruct.IMAGE_MARKER)
        assert not any(instruct.IMAGE_MARKER in question for question, _ in turns[1:])
        questions = [q.replace(instruct.IMAGE_MARKER, "") for q, _ in turns]
        captions = [a for q, (_, a) in zip(questions, turns) if q == instruct.CAPTION_REQUEST]
        with_caption += len(captions)
        assert captions in ([], [shapes_world.caption(scene)])
        named = any(shapes_world.unique_name(s, scene["shapes"]) for s in scene["shapes"])
        expected = {"color", "kind", "count", "exists"} | ({"position"} if named else set())
        asked = [question_type(q) for q in questions if q != instruct.CAPTION_REQUEST]
        assert sorted(asked) == sorted(expected), turns
    assert 0.2 < with_caption / len(data.pairs) < 0.4  # 30 % in expectation


def write_llava(tmp_path, n_good=6):
    scenes = write_images(tmp_path / "coco", n_good)
    records = [dict(id=f"good{i}", image=f"img{i}.png", conversations=[
        dict(**{"from": "human", "value": "<image>\nwhat is in the picture?"}),
        dict(**{"from": "gpt", "value": shapes_world.caption(scene)}),
        dict(**{"from": "human", "value": "how many shapes are there?"}),
        dict(**{"from": "gpt", "value": shapes_world.NUMBERS[len(scene["shapes"])]})]) for i, scene in enumerate(scenes)]
    human, gpt = {"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "hello"}
    records += [dict(id="no_image", image="missing.png", conversations=[human, gpt]),
                dict(id="two_markers", image="img0.png", conversations=[{"from": "human", "value": "<image><image>"}, gpt]),
                dict(id="empty", image="img0.png", conversations=[]),
                dict(id="order", image="img0.png", conversations=[gpt, human]),
                dict(id="null", image="img0.png", conversations=[human, {"from": "gpt", "value": None}]),
                dict(id="strings", image="img0.png", conversations=["<image> hi", "hello"]),
                dict(id="long", image="img0.png", conversations=[  # the image lands past the 64-token context
                    {"from": "human", "value": "what is this? " * 40 + "<image>"}, gpt]),
                dict(id="again", image="img1.png", conversations=[human, gpt])]  # a second conversation on img1
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(records))
    return path


def test_llava_json_skips_bad_records_loudly_and_trains_one_step(tmp_path, capsys):
    path = write_llava(tmp_path, n_good=60)
    cfg = dict(caption_config(tmp_path, max_iters=1), instruct_source=str(path), image_folder=str(tmp_path / "coco"),
               projector_lr_scale=3.0)
    vlm = tiny_vlm()
    vlm.llm = tiny_model(vocab_size=264, context=64)
    vlm.llm.requires_grad_(True)
    batches = instruct.ConversationBatches(vlm, tokenizer_for_tests(), cfg, torch.device("cpu"))
    out = capsys.readouterr().out
    for name, reason in [("no_image", "image not found"), ("two_markers", "exactly one <image>"),
                         ("empty", "empty conversation"), ("order", "alternate human, gpt"),
                         ("null", "every turn must be"), ("strings", "every turn must be")]:
        assert any(f"(id {name})" in line and reason in line for line in out.splitlines()), (name, out)
    assert "skipped 6 of 68 records" in out
    assert "skipping a train conversation (the image does not fit in the context): 'what is this?" in out
    assert (len(batches.sets["train"].pairs), len(batches.sets["val"].pairs)) == (60, 1)
    assert len(batches.sets["train"].images) == 59  # img1's two conversations share one encoded image
    grads = gradients_at_step(lambda: (pretrain.train(cfg, vlm, batches, lr_scale=lambda n: 3.0 if
                                                      n.startswith("projector.") else 1.0), vlm)[1])
    assert grads and all(not name.startswith("vit.") for name in grads)  # the encoder is not even optimized
    assert all(vlm.get_parameter(name).grad is None for name, _ in vlm.vit.named_parameters(prefix="vit"))
    assert grads["projector.fc1.weight"].abs().sum() > 0 and grads["llm.layers.0.attn.q_proj.weight"].abs().sum() > 0


def test_answering_with_the_kv_cache_equals_full_recompute():
    vlm = tiny_vlm()
    features = torch.randn(2, 16, 128)
    after = torch.tensor([[20, 21, EOT_ID, ASSISTANT_ID], [22, 23, EOT_ID, ASSISTANT_ID]])
    got = align.caption_images(vlm, features, 10, (BOS_ID, USER_ID), after)
    for row in range(2):
        prefix = torch.tensor([BOS_ID, USER_ID] + [IMAGE_ID] * vlm.n_image_tokens + after[row].tolist())
        assert got[row] == greedy_by_full_recompute(vlm, prefix, features[row], 10)


# ----------------------------------------------------------------------------------------------------------
# Phases 2 and 3 from the command line, and every bad input
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_vlm_ckpts(tiny_ckpt, tmp_path_factory):
    """A tiny phase-2 checkpoint (random 32 px encoder) and a phase-3 checkpoint on top of it, made by the CLIs."""
    llm_ckpt, _ = tiny_ckpt
    out = tmp_path_factory.mktemp("vlm")
    common = ["--image_size=32", "--max_iters=3", "--eval_interval=3", "--eval_iters=1", "--batch_size=4",
              "--train_images=64", "--eval_images=8", "--device=cpu", "--log_interval=1"]
    result = run("align.py", f"--llm_ckpt={llm_ckpt}", "--vision_weights=none", "--projector_hidden=32",
                 f"--out_dir={out / 'align'}", *common)
    assert result.returncode == 0, result.stderr
    assert "caption exact" in result.stdout and "VLM:" in result.stdout
    result = run("instruct.py", f"--align_ckpt={out / 'align' / 'ckpt.pt'}", f"--out_dir={out / 'instruct'}", *common)
    assert result.returncode == 0, result.stderr
    assert "answer all" in result.stdout and "answer count" in result.stdout
    return out / "align" / "ckpt.pt", out / "instruct" / "ckpt.pt", llm_ckpt


def test_a_checkpoint_of_another_phase_is_one_clear_error(tiny_ckpt, tiny_vlm_ckpts, tmp_path):
    """Starting phase 3 from a phase-1 checkpoint, exporting a phase-2 checkpoint, or resuming one phase in
    another phase's folder: each stops with one line naming the problem, before anything is written."""
    import shutil
    align_ckpt, instruct_ckpt, llm_ckpt = tiny_vlm_ckpts
    assert_clean_error(run("instruct.py", f"--align_ckpt={llm_ckpt}", f"--out_dir={tmp_path / 'new'}"),
                       "not a phase-2 or phase-3 checkpoint", "python align.py")
    assert_clean_error(run("export_hf.py", str(align_ckpt), str(tmp_path / "hf")), "phase-2/3", "phase-1")
    assert not (tmp_path / "new").exists() and not (tmp_path / "hf").exists()
    folders = {phase: tmp_path / phase for phase in ("pretrain", "align", "instruct")}
    for phase, ckpt in zip(folders, (llm_ckpt, align_ckpt, instruct_ckpt)):
        shutil.copytree(ckpt.parent, folders[phase])
    before = {phase: sorted(os.listdir(folder)) for phase, folder in folders.items()}
    vlm = ["--image_size=32", "--batch_size=4", "--train_images=64", "--eval_images=8", "--device=cpu"]
    runs = [  # (the script's main, its arguments, whose folder it resumes in)
        (pretrain.main, [*tiny_ckpt[1][1:], f"--out_dir={folders['align']}"], "align"),
        (align.main, [f"--llm_ckpt={llm_ckpt}", "--vision_weights=none", "--projector_hidden=32",
                      f"--out_dir={folders['instruct']}", *vlm], "instruct"),
        (instruct.main, [f"--align_ckpt={align_ckpt}", f"--out_dir={folders['align']}", *vlm], "align"),
        (align.main, [f"--llm_ckpt={llm_ckpt}", "--vision_weights=none", "--projector_hidden=32",
                      f"--out_dir={folders['pretrain']}", *vlm], "pretrain")]
    for main, args, owner in runs:
        this = main.__module__
        with pytest.raises(pretrain.TrainingError, match=f"was written by {owner}.py, not {this}.py"):
            main([*args, "--resume=True"])
    assert {phase: sorted(os.listdir(folder)) for phase, folder in folders.items()} == before


def test_instruct_trains_the_projector_at_projector_lr_scale_times_the_lr(tiny_vlm_ckpts):
    """Phase 3's optimizer, as its checkpoint saved it: the projector's parameters (and only they) sit in groups
    whose learning rate at the last step was projector_lr_scale (instruct's default, 4) times the LLM's, which
    is lr_at that step."""
    _, instruct_ckpt, _ = tiny_vlm_ckpts
    state = torch.load(instruct_ckpt, weights_only=True)
    config, groups = state["config"], state["optimizer"]["param_groups"]
    scale = config["projector_lr_scale"]
    assert scale == 4.0
    lr = pretrain.lr_at(state["step"] - 1, config)
    projector = [g for g in groups if g["lr"] == pytest.approx(scale * lr, rel=1e-9)]
    llm = [g for g in groups if g["lr"] == pytest.approx(lr, rel=1e-9)]
    assert len(projector) + len(llm) == len(groups) and projector and llm
    vlm, _, _ = align.vlm_from_checkpoint(str(instruct_ckpt))
    assert sum(len(g["params"]) for g in projector) == len(list(vlm.projector.parameters()))
    assert sum(len(g["params"]) for g in llm) == len(list(vlm.llm.parameters()))


def test_align_resume_caches_features_from_its_own_encoder(tiny_vlm_ckpts, tmp_path):
    """A resumed run encodes its images with the encoder it was trained with, whatever --vision_weights says."""
    import shutil
    from data.captions import caption_set
    align_ckpt, _, llm_ckpt = tiny_vlm_ckpts
    run_dir = tmp_path / "align"
    shutil.copytree(align_ckpt.parent, run_dir)
    torch.save(align.build_vision_transformer(dict(CONFIG, **VISION)).state_dict(), tmp_path / "other.pth")
    align.main([f"--llm_ckpt={llm_ckpt}", f"--vision_weights={tmp_path / 'other.pth'}", "--projector_hidden=32",
                f"--out_dir={run_dir}", "--resume=True", "--image_size=32", "--max_iters=4", "--eval_interval=4",
                "--eval_iters=1", "--batch_size=4", "--train_images=64", "--eval_images=8", "--device=cpu"])
    vlm, _, state = align.vlm_from_checkpoint(str(run_dir / "ckpt.pt"))
    image = caption_set(state["config"], "train").images[0]()
    features = vlm.image_features(align.image_transform(state["config"])(image)[None])[0]
    cached = torch.from_numpy(np.load(run_dir / "features_train.npy")[0].astype(np.float32))
    torch.testing.assert_close(features, cached, atol=1e-2, rtol=1e-2)  # the cache is float16


def test_every_phase_logs_mfu_on_a_known_gpu(tiny_data, tiny_vlm_ckpts, tmp_path, monkeypatch, capsys):
    """On a GPU whose peak peak_flops knows, every phase's training log shows MFU, so each phase must hand train
    its model's FLOPs; simulated on the CPU with an H100's peak. (The loop used to read them from model.config,
    which the Shapes World encoder's classifier lacks: python align.py crashed on an H100, H200 or A100.)"""
    monkeypatch.setattr(pretrain, "peak_flops", lambda device: 989e12)
    align_ckpt, _, llm_ckpt = tiny_vlm_ckpts
    short = ["--max_iters=2", "--eval_interval=2", "--eval_iters=1", "--log_interval=1", "--device=cpu"]
    vlm = ["--image_size=32", "--batch_size=4", "--train_images=64", "--eval_images=8", *short]
    phases = {
        "pretrain": lambda out: pretrain.main([
            f"--data_dir={tiny_data['data_dir']}", "--vocab_size=320", "--shapes_docs=3000", "--dim=32",
            "--n_heads=4", "--n_kv_heads=2", "--ffn_hidden=48", "--moe_hidden=24", "--context=64",
            "--attn_chunk=16", "--batch_size=2", f"--out_dir={out}", *short]),
        "shapes_encoder": lambda out: shapes_encoder.pretrain_shapes_encoder(
            config_module.get_config("align", ["--image_size=32", "--encoder_steps=2", "--encoder_images=64",
                                              "--device=cpu"]),
            torch.device("cpu"), str(out / "encoder.pt")),
        "align": lambda out: align.main([f"--llm_ckpt={llm_ckpt}", "--vision_weights=none", "--projector_hidden=32",
                                         f"--out_dir={out}", *vlm]),
        "instruct": lambda out: instruct.main([f"--align_ckpt={align_ckpt}", f"--out_dir={out}", *vlm]),
    }
    for phase, main in phases.items():
        main(tmp_path / phase)
        log = capsys.readouterr().out
        steps = [line for line in log.splitlines() if line.startswith("step ")]
        assert steps and all(" | MFU " in line for line in steps), (phase, log)
        if phase != "shapes_encoder":  # the LLM's experts report their load, also inside the VLM
            assert "experts min/max share" in log, (phase, log)
        ckpt = tmp_path / phase / ("shapes_vit_training" if phase == "shapes_encoder" else "") / "ckpt.pt"
        assert torch.load(ckpt, weights_only=True)["phase"] == phase


def test_a_first_align_run_and_a_rerun_start_from_the_same_projector(tiny_vlm_ckpts, tmp_path):
    """The first `python align.py` trains the Shapes World encoder in-process and a rerun reads it from its cache;
    both must then initialise the same projector, or a rerun of the README's command gives other captions."""
    _, _, llm_ckpt = tiny_vlm_ckpts
    config = config_module.get_config("align", [f"--llm_ckpt={llm_ckpt}", "--image_size=32", "--encoder_steps=2",
                                                "--encoder_images=64", "--projector_hidden=32", "--device=cpu",
                                                f"--out_root={tmp_path}"])
    projectors = []
    for run in ("trains the encoder", "reads it from the cache"):
        torch.manual_seed(config["seed"])  # as align.main does
        vlm, _, _ = align.build_vlm(config, torch.device("cpu"))
        projectors.append({k: v.clone() for k, v in vlm.projector.state_dict().items()})
        assert len(list((tmp_path / "align").glob("shapes_vit_*.pt"))) == 1, run
    for key in projectors[0]:
        assert torch.equal(projectors[0][key], projectors[1][key]), key


def huge_png(path, side=100_000):
    """A tiny file that claims to be a side x side PNG: a decompression bomb as far as a decoder knows."""
    import struct
    import zlib
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 10))
                     + chunk(b"IEND", b""))


def test_caption_cli_and_its_bad_input(tiny_vlm_ckpts, tmp_path):
    align_ckpt, instruct_ckpt, _ = tiny_vlm_ckpts
    shapes_world.render(shapes_world.make_scenes("test", 1)[0], 64).save(tmp_path / "scene.png")
    ok = run("caption.py", str(tmp_path / "scene.png"), f"--ckpt={align_ckpt}", "--max_new_tokens=5")
    assert ok.returncode == 0 and ok.stderr == "", ok.stderr
    ok = run("caption.py", str(tmp_path / "scene.png"), f"--ckpt={instruct_ckpt}", "--prompt",
             "how many shapes are there?", "--max_new_tokens=5")
    assert ok.returncode == 0, ok.stderr
    (tmp_path / "text.jpg").write_text("this is not a picture")
    (tmp_path / "empty.png").write_bytes(b"")
    jpeg = tmp_path / "whole.jpg"
    shapes_world.render(shapes_world.make_scenes("test", 1)[0], 64).save(jpeg)
    (tmp_path / "cut.jpg").write_bytes(jpeg.read_bytes()[:300])
    huge_png(tmp_path / "bomb.png")
    for image, phrase in [("missing.png", "no such image"), ("", "is a directory"), ("text.jpg", "not an image"),
                          ("empty.png", "empty (0 bytes)"), ("cut.jpg", "truncated or corrupt"),
                          ("bomb.png", "too large")]:
        assert_clean_error(run("caption.py", str(tmp_path / image), f"--ckpt={align_ckpt}"), phrase)
    assert_clean_error(run("caption.py", str(tmp_path / "scene.png"), f"--ckpt={tmp_path / 'none.pt'}"),
                       "python align.py")
    assert_clean_error(run("caption.py", str(tmp_path / "scene.png"), "--ckpt=" + str(tiny_vlm_ckpts[2])),
                       "not a phase-2 or phase-3 checkpoint")
    assert_clean_error(run("caption.py", str(tmp_path / "scene.png"), f"--ckpt={instruct_ckpt}",
                           "--prompt=" + "how many shapes " * 40), "context is 64")
    assert_clean_error(run("caption.py"), "name an image")
    assert_clean_error(run("caption.py", str(tmp_path / "scene.png"), f"--ckpt={instruct_ckpt}",
                           "--prompt=what is <|image|>?"), "special token")
    assert_clean_error(run("sample.py", f"--ckpt={align_ckpt}", "--prompt=a"), "phase-2/3")


def test_any_pillow_image_mode_is_captioned(tiny_vlm_ckpts, tmp_path):
    from PIL import Image
    vlm, tokenizer, state = align.vlm_from_checkpoint(str(tiny_vlm_ckpts[0]))
    base = shapes_world.render(shapes_world.make_scenes("test", 1)[0], 64)
    variants = {mode: base.convert(mode) for mode in ("RGB", "L", "RGBA", "P", "CMYK", "1", "LA", "F", "I")}
    variants["I;16"] = Image.fromarray((np.asarray(base.convert("L"), dtype=np.uint16) * 257))
    variants["tall"] = base.resize((7, 300))
    for name, image in variants.items():
        path = tmp_path / f"{name.replace(';', '_')}.{'tif' if name in ('F', 'I', 'I;16', 'CMYK') else 'png'}"
        image.save(path)
        pixels = align.image_transform(state["config"])(align.open_image(str(path)))
        assert pixels.shape == (3, 32, 32) and torch.isfinite(pixels).all(), name
        assert isinstance(align.caption_images(vlm, vlm.image_features(pixels[None]), 3)[0], list)
    grey16 = align.to_rgb(variants["I;16"])
    assert np.asarray(grey16).max() > 200 and np.asarray(grey16).min() < 60  # rescaled, not clipped to white


def test_align_bad_input(tiny_vlm_ckpts, tmp_path, monkeypatch):
    _, _, llm_ckpt = tiny_vlm_ckpts
    assert_clean_error(run("align.py", f"--llm_ckpt={tmp_path / 'none.pt'}", f"--out_dir={tmp_path / 'a'}"),
                       "python pretrain.py")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    foreign = Tokenizer(models.BPE())
    foreign.pre_tokenizer = pre_tokenizers.ByteLevel()
    foreign.train_from_iterator(["some other text"], trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>"]))
    state = torch.load(llm_ckpt, weights_only=True)
    torch.save(dict(state, tokenizer=foreign.to_str()), tmp_path / "foreign.pt")
    assert_clean_error(run("align.py", f"--llm_ckpt={tmp_path / 'foreign.pt'}", f"--out_dir={tmp_path / 'a'}"),
                       "tokenizer without <|begin_of_text|>")
    assert_clean_error(run("align.py", f"--llm_ckpt={llm_ckpt}", "--vision_weights=nothing.pth",
                           f"--out_dir={tmp_path / 'a'}"), "no such file")
    # The ImageNet weights cannot be downloaded: the download itself is replaced, so that the test never starts
    # a 330 MB transfer on a machine that has a network (torch.hub calls it when its cache lacks the file).
    import urllib.error
    attempts = []

    def no_network(url, *args, **kwargs):
        attempts.append(url)
        raise urllib.error.URLError("no network in this test")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty cache
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    vit_b = dict(CONFIG, vision_model="vit_b_16", vision_weights="IMAGENET1K_V1")
    with pytest.raises(DataError, match="put vit_b_16-c867db91.pth from https://.* at .*torch/hub/checkpoints"):
        align.load_vision_weights(align.build_vision_transformer(vit_b), vit_b, torch.device("cpu"))
    assert [os.path.basename(url) for url in attempts] == ["vit_b_16-c867db91.pth"]
    assert_clean_error(run("align.py", f"--llm_ckpt={llm_ckpt}", "--caption_source=hf", "--vision_weights=none",
                           f"--out_dir={tmp_path / 'a'}", env={"HF_HUB_OFFLINE": "1"}), "caption_source=path")
    assert not (tmp_path / "a").exists()


def test_compiled_model_matches_eager():
    """--compile=True: torch.compile's graph gives the eager model's loss and gradients (grouped_mm included)."""
    model = tiny_model().train()
    batch = random_batch(3, 2)
    _, loss, aux = model(**batch)
    (loss + 0.01 * aux).backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    _, compiled_loss, compiled_aux = torch.compile(model)(**batch)
    (compiled_loss + 0.01 * compiled_aux).backward()
    assert compiled_loss.item() == pytest.approx(loss.item(), rel=1e-5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, eager[name], atol=1e-5, rtol=1e-4, msg=name)


def test_compiled_bf16_experts_with_grouped_mm_in_their_graph_match_eager():
    """In fp32 the experts' grouped_mm runs eagerly (the compiler lowers it for bf16 only), so the test above
    never compiles it. Under bf16 autocast (on the CPU too) it is compiled: fullgraph=True makes any graph
    break an error, so the MoE layer, grouped_mm included, is one graph. (One layer, not the whole model: the
    CPU compiler takes a while per kernel.) Output and gradients match eager bf16 within bf16's precision."""
    torch.manual_seed(0)
    moe = MoE(dict(TINY, **ALL_EXPERTS))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 8, TINY["dim"])
    results = {}
    for name, run in (("eager", moe), ("compiled", torch.compile(moe, fullgraph=True))):
        moe.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, aux, _ = run(x)
        ((out.float() ** 2).mean() + aux).backward()
        results[name] = out.float(), {n: p.grad.clone() for n, p in moe.named_parameters()}
    (eager_out, eager), (compiled_out, compiled) = results["eager"], results["compiled"]
    assert (compiled_out - eager_out).norm() <= 0.02 * eager_out.norm()
    assert_every_parameter_has_a_gradient(compiled, moe)
    assert_gradients_close(compiled, eager, 0.03)


# ----------------------------------------------------------------------------------------------------------
# Issue 13: the scorers behind the headline numbers, and held-out scenes that training never sees
# ----------------------------------------------------------------------------------------------------------

TWO_SHAPES = {"shapes": [{"kind": "circle", "color": "red", "size": "large", "position": "top left"},
                         {"kind": "square", "color": "blue", "size": "small", "position": "center"}],
              "background": (240, 240, 240)}
NOTHING_RIGHT = {"exact": False, "kind": 0.0, "color": 0.0, "size": 0.0, "position": 0.0, "count": False}


@pytest.mark.parametrize("text, expected", [
    # exact, also without the final full stop and in capitals
    ("a large red circle in the top left and a small blue square in the center.",
     {"exact": True, "kind": 1.0, "color": 1.0, "size": 1.0, "position": 1.0, "count": True}),
    ("A large red circle in the top left and a small blue square in the center",
     {"exact": True, "kind": 1.0, "color": 1.0, "size": 1.0, "position": 1.0, "count": True}),
    # the same shapes in another order describe the same scene
    ("a small blue square in the center and a large red circle in the top left.",
     {"exact": True, "kind": 1.0, "color": 1.0, "size": 1.0, "position": 1.0, "count": True}),
    # one attribute of one shape wrong: that shape loses that attribute's point only
    ("a large green circle in the top left and a small blue square in the center.",
     {"exact": False, "kind": 1.0, "color": 0.5, "size": 1.0, "position": 1.0, "count": True}),
    ("a large red circle in the top left and a small blue star in the center.",
     {"exact": False, "kind": 0.5, "color": 1.0, "size": 1.0, "position": 1.0, "count": True}),
    # a two-word position wrong: the circle is matched with the leftover shape, right but for its place
    ("a large red circle in the top right and a small blue square in the center.",
     {"exact": False, "kind": 1.0, "color": 1.0, "size": 1.0, "position": 0.5, "count": True}),
    # a shape missing: the missing shape scores nothing
    ("a small blue square in the center.",
     {"exact": False, "kind": 0.5, "color": 0.5, "size": 0.5, "position": 0.5, "count": False}),
    # an extra shape: every true shape is right, but the caption is not exact and the count is wrong
    ("a large red circle in the top left, a small blue square in the center and a small red star at the bottom.",
     {"exact": False, "kind": 1.0, "color": 1.0, "size": 1.0, "position": 1.0, "count": False}),
    # not in the caption form: a synonym, a truncated or an empty generation scores nothing
    ("a large red circle in the top left and a small blue square in the centre.", NOTHING_RIGHT),
    ("a large red circle in the top left and a small blue", NOTHING_RIGHT),
    ("", NOTHING_RIGHT),
])
def test_caption_score_on_hand_written_captions(text, expected):
    assert shapes_world.score_caption(text, TWO_SHAPES) == expected


def test_grid_statement_is_every_cell_in_reading_order():
    """The grid form written out by hand for one scene, and for random scenes read back cell by cell: nine
    cells in reading order, each the shape there or "empty", nothing else."""
    scene = {"shapes": [{"kind": "circle", "color": "red", "size": "large", "position": "top"},
                        {"kind": "star", "color": "blue", "size": "small", "position": "right"}]}
    assert shapes_world.state_grid(scene, random.Random(0)) == (
        "the grid, row by row:\n"
        "top left: empty, top: large red circle, top right: empty\n"
        "left: empty, center: empty, right: small blue star\n"
        "bottom left: empty, bottom: empty, bottom right: empty")
    rng = random.Random(1)
    for _ in range(50):
        scene = shapes_world.random_scene(rng)
        lines = shapes_world.state_grid(scene, rng).split("\n")
        cells = [cell.split(": ") for line in lines[1:] for cell in line.split(", ")]
        assert [place for place, _ in cells] == list(shapes_world.POSITIONS)
        shapes = {s["position"]: f"{s['size']} {s['color']} {s['kind']}" for s in scene["shapes"]}
        assert [said for _, said in cells] == [shapes.get(place, "empty") for place in shapes_world.POSITIONS]


@pytest.mark.parametrize("text, expected, right", [
    ("bottom left", "bottom left", True), (" two ", "two", True), ("yes", "yes", True),
    ("bottom", "bottom left", False), ("bottom left", "bottom", False), ("centre", "center", False),
    ("yes.", "yes", False), ("", "no", False), ("tw", "two", False), ("red circle", "red", False),
])
def test_answer_score_on_hand_written_answers(text, expected, right):
    assert shapes_world.score_answer(text, expected) is right


def scenes_in_text(document):
    """Every shape a Shapes World pretraining document states, read back from its text by patterns written here
    for each phrasing (an independent reading of what `describe` wrote). Returns a set of shape tuples."""
    import re
    kinds, colors = "|".join(shapes_world.KINDS), "|".join(shapes_world.COLORS)
    places = "|".join(sorted(shapes_world.PLACES.values(), key=len, reverse=True))
    cells = "|".join(sorted(shapes_world.POSITIONS, key=len, reverse=True))
    place_to_cell = {v: k for k, v in shapes_world.PLACES.items()}
    found = set()
    for size, color, kind, place in re.findall(rf"a (small|large) ({colors}) ({kinds}) ({places})", document):
        found.add((kind, color, size, place_to_cell[place]))
    for place, size, color, kind in re.findall(rf"({places}) there is a (small|large) ({colors}) ({kinds})", document):
        found.add((kind, color, size, place_to_cell[place]))
    for size, color, kind, cell in re.findall(rf"- (small|large) ({colors}) ({kinds}), ({cells})$", document, re.M):
        found.add((kind, color, size, cell))
    for place, size, color, kind in re.findall(rf"the shape ({places}) is a (small|large) ({colors}) ({kinds})",
                                               document):
        found.add((kind, color, size, place_to_cell[place]))
    for kind, place, color, size in re.findall(rf"the ({kinds}) ({places}) is ({colors}) and (small|large)",
                                               document):
        found.add((kind, color, size, place_to_cell[place]))
    return found


def scene_key(scene):
    return frozenset((s["kind"], s["color"], s["size"], s["position"]) for s in scene["shapes"])


@pytest.mark.parametrize("seed", [1337, 1, 2])
def test_no_held_out_scene_is_trained_on(seed):
    """By content, not by split flag: the scenes every phase scores on (phase-2 captions, phase-3 answers, the
    copy test) share no scene with anything a phase trains on (the phase-1 corpus, read back from its text;
    the encoder's, phase 2's and phase 3's training scenes)."""
    config = dict(CONFIG, seed=seed)
    held_out = [scene_key(s) for s in align.caption_set(config, "val").scenes[:config["eval_images"]]]
    held_out += [scene_key(s) for s in instruct.shapes_conversations("val", 100, seed, 64).scenes]
    held_out += [scene_key(s) for s in shapes_world.make_scenes("val", 60, seed=1)]  # copy test / probe
    held_out = set(held_out)
    align_images = config_module.get_config("align", [])["train_images"]  # align's own default, more than CONFIG's
    trained = {scene_key(s) for s in align.caption_set(dict(config, train_images=align_images), "train").scenes}
    trained |= {scene_key(s) for s in instruct.shapes_conversations("train", CONFIG["train_images"], seed, 64).scenes}
    trained |= {scene_key(s) for s in shapes_world.make_scenes("train", CONFIG["encoder_images"], seed=seed + 1)}
    assert len(held_out) > 200 and len(trained) > 20_000
    assert not held_out & trained
    documents = shapes_world.text_documents("train", CONFIG["shapes_docs"], seed=seed)
    for document in documents:
        shapes = scenes_in_text(document)
        assert shapes, f"no shape read back from {document!r}: teach scenes_in_text the new phrasing"
        assert frozenset(shapes) not in held_out, document


# ----------------------------------------------------------------------------------------------------------
# Issue 12: the README's quick start
# ----------------------------------------------------------------------------------------------------------

# Appended to the README's own commands so that each phase runs in seconds; the commands stay the README's.
QUICK_START_TINY = {
    "pretrain.py": ["--shapes_docs=500", "--max_iters=2", "--eval_iters=1", "--batch_size=4"],
    "align.py": ["--encoder_steps=2", "--train_images=32", "--eval_images=4", "--max_iters=2", "--eval_iters=1",
                 "--batch_size=4"],
    "instruct.py": ["--train_images=32", "--eval_images=2", "--max_iters=2", "--eval_iters=1", "--batch_size=4"],
    "dpo.py": ["--pref_scenes=6", "--pref_samples=1", "--eval_images=4", "--max_iters=2", "--eval_iters=1",
               "--batch_size=4"],
    "sample.py": ["--max_new_tokens=8"],
    "caption.py": ["--max_new_tokens=8"],
}


def quick_start_commands(readme):
    """The commands of the README's quick-start block, in order, each split as a shell would."""
    import shlex
    section = readme.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def run_quick_start(readme, workdir):
    """Run the quick start in a copy of the repository's code, command by command at tiny sizes; the first
    failure is returned as (command, stderr), else None."""
    import shutil
    skip = lambda folder, names: [n for n in names if n in (".git", "out", "__pycache__", ".pytest_cache")
                                  or folder == os.path.join(REPO, "data") and os.path.isdir(os.path.join(folder, n))]
    shutil.copytree(REPO, workdir, ignore=skip)  # the code and docs/, without generated data or checkpoints
    for command in quick_start_commands(readme):
        if command[:2] == ["pip", "install"]:
            continue  # this machine has the requirements already
        assert command[0] == "python", f"the quick start should hold python and pip commands only: {command}"
        script = command[2] + ".py" if command[1] == "-m" else command[1]
        extra = QUICK_START_TINY.get(script, []) + (["--device=cpu"] if script in QUICK_START_TINY else [])
        result = subprocess.run([sys.executable, *command[1:], *extra], cwd=workdir, capture_output=True,
                                text=True, timeout=300)
        if result.returncode != 0:
            return " ".join(command), result.stderr
    return None


def test_readme_quick_start_runs_as_written(tmp_path):
    """Every command of the README's quick start works, in the README's order, on a copy of the repository
    with no data or checkpoints yet: a command that needs a file an earlier one did not write fails here."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    commands = quick_start_commands(readme)
    scripts = [c[1] for c in commands]
    for phase in ("pretrain.py", "align.py", "instruct.py", "dpo.py"):
        assert phase in scripts, f"the quick start should run {phase}"
    assert run_quick_start(readme, tmp_path / "repo") is None
    out = tmp_path / "repo" / "out"
    for phase in ("pretrain", "align", "instruct", "dpo"):
        assert (out / phase / "ckpt.pt").is_file(), f"the quick start did not write out/{phase}/ckpt.pt"


def test_loss_plot_reads_the_runs_printed_lines(tmp_path):
    """docs/figures.py plots exactly the train and val losses a run printed, and nothing else it printed."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("figures", os.path.join(REPO, "docs", "figures.py"))
    figures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(figures)
    log = tmp_path / "log.txt"
    log.write_text("wrote 2,698,393 training tokens; predicting tokens from their frequencies alone gives val loss 3.766\n"
                   "step      1 | loss 6.2713 | aux 1.019 | lr 1.00e-05 | 6,687 tok/s\n"
                   "eval step 250: val loss 0.7084 | perplexity 2.03 | copy color 1.802 | probe all 0.500\n"
                   "  step 3 | loss 9.9 (indented: not a log line)\n"
                   "step    250 | loss 0.7027 | aux 1.002 | lr 4.53e-04 | 7,956 tok/s\n")
    assert figures.read_log(log) == ([(1, 6.2713), (250, 0.7027)], [(250, 0.7084)], 3.766)
    result = run(os.path.join("docs", "figures.py"), "loss", str(log), str(tmp_path / "loss.svg"))
    assert result.returncode == 0, result.stderr
    assert "final 0.7084" in (tmp_path / "loss.svg").read_text()
    assert_clean_error(run(os.path.join("docs", "figures.py"), "loss", str(tmp_path / "none.txt"), "x.svg"),
                       "no such log file")


# ----------------------------------------------------------------------------------------------------------
# Phase 4: DPO
# ----------------------------------------------------------------------------------------------------------


def tiny_dpo(seed=0, same=False, nll_coef=0.0, dpop_lambda=0.0):
    """A DPO of a tiny VLM (vocabulary of tokenizer_for_tests) and a reference: the same weights (same=True), or
    the policy's with every LLM and projector weight nudged, so that reference and policy disagree."""
    policy = tiny_vlm(seed)
    policy.llm = tiny_model(seed, vocab_size=264, context=64)
    policy.llm.requires_grad_(True)
    model = dpo.DPO(policy, beta=0.3, nll_coef=nll_coef, dpop_lambda=dpop_lambda)
    if not same:
        with torch.no_grad():
            for name, param in model.reference.named_parameters():
                if not name.startswith("vit."):
                    param.add_(0.05 * torch.randn_like(param))
    return model


def tiny_pairs(tokenizer, n_image_tokens):
    """Four pairs - two answers, two captions asked for in a turn - and their padded batch."""
    ask = instruct.CAPTION_REQUEST
    pairs = [dpo.Pair(0, "is there a red circle?", "yes", "no", "test"),
             dpo.Pair(1, "where is the blue star?", "top left", "bottom right", "test"),
             # short captions: the test tokenizer spells most words letter by letter, in a context of 64
             dpo.Pair(2, ask, "a small red circle.", "a large green star.", "test"),
             dpo.Pair(3, ask, "a blue square.", "a blue square and a red star.", "test")]
    features = torch.randn(4, 16, 128)
    batches = dpo.PreferenceBatches({"train": (pairs, features), "val": (pairs, features)}, tokenizer,
                                    n_image_tokens, 64, dict(batch_size=4, eval_iters=1, seed=0, cut_rejected=0),
                                    torch.device("cpu"))
    return pairs, batches


def hand_logprob(logits_row, targets_row):
    """sum_t log softmax(logits[t])[target[t]] over the labelled positions, one position at a time."""
    total = 0.0
    for t, target in enumerate(targets_row.tolist()):
        if target != -100:
            row = logits_row[t].double()
            total += (row[target] - torch.logsumexp(row, 0)).item()
    return total


@pytest.mark.parametrize("dpop_lambda", [0.0, 2.0])
def test_dpo_loss_and_margins_match_a_brute_force_from_logits(dpop_lambda):
    """Each pair scored alone, row by row, its log-probs summed by hand: the batched forward (chosen and
    rejected rows stacked, features shared, both models) gives the same margins, and the same loss: DPO's plus
    nll_coef times the chosen responses' mean per-token loss. With dpop_lambda (DPO-Positive) the loss's
    sigmoid also takes beta * lambda * (log ref(y_w) - log pi(y_w)) off the margin of each pair whose chosen
    response the policy finds less likely than the reference does, and nothing off the others."""
    model, tokenizer = tiny_dpo(nll_coef=0.5, dpop_lambda=dpop_lambda), tokenizer_for_tests()
    _, batches = tiny_pairs(tokenizer, model.policy.n_image_tokens)
    batch = batches.batch("train", [0, 1, 2, 3])
    margins, loss, _ = model.eval()(**batch)
    B = 4
    expected, fallen, chosen_nll, chosen_tokens = [], [], 0.0, 0
    for i in range(B):
        reward = {}
        for name, net in (("policy", model.policy), ("reference", model.reference)):
            with torch.no_grad():
                chosen = net(batch["tokens"][i:i + 1], features=batch["features"][i:i + 1])[0][0]
                rejected = net(batch["tokens"][B + i:B + i + 1], features=batch["features"][i:i + 1])[0][0]
            reward[name] = (hand_logprob(chosen, batch["targets"][i]), hand_logprob(rejected, batch["targets"][B + i]))
        chosen_nll -= reward["policy"][0]
        chosen_tokens += (batch["targets"][i] != -100).sum().item()
        expected.append(0.3 * ((reward["policy"][0] - reward["reference"][0])
                               - (reward["policy"][1] - reward["reference"][1])))
        fallen.append(reward["reference"][0] - reward["policy"][0])
    assert margins.tolist() == pytest.approx(expected, abs=1e-4)  # DPO's margins, with or without DPOP
    assert min(fallen) < 0 < max(fallen)  # some chosen responses became likelier, some less likely
    penalties = [0.3 * dpop_lambda * f if f > 0 else 0.0 for f in fallen]
    dpo_part = sum(math.log(1 + math.exp(-(m - p))) for m, p in zip(expected, penalties)) / B
    assert loss.item() == pytest.approx(dpo_part + 0.5 * chosen_nll / chosen_tokens, abs=1e-5)
    assert len(set(round(m, 3) for m in expected)) == B  # four different margins: no pair was scored twice


def test_dpo_at_step_zero_has_loss_ln_2_and_zero_margins():
    model, tokenizer = tiny_dpo(same=True), tokenizer_for_tests()
    _, batches = tiny_pairs(tokenizer, model.policy.n_image_tokens)
    margins, loss, _ = model.train()(**batches.batch("train", [0, 1, 2, 3]))  # the policy in training mode
    assert torch.equal(margins, torch.zeros(4))
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)


def test_summed_logprob_is_a_hand_sum_over_exactly_the_response_tokens():
    """Each sequence written out by hand, the scored positions counted by hand: those that predict a response
    token or its end marker. Image, prompt and padding add nothing, however large their logits."""
    tokenizer = tokenizer_for_tests()
    e = lambda text: pretrain.encode(tokenizer, text)
    pairs, batches = tiny_pairs(tokenizer, 4)
    batch = batches.batch("train", [0, 1, 2, 3])
    logits = torch.randn(*batch["tokens"].shape, 264)
    got = dpo.sequence_logprobs(logits, batch["targets"])
    for row in range(8):
        pair = pairs[row % 4]
        response = pair.chosen if row < 4 else pair.rejected
        prompt, reply = [BOS_ID, USER_ID] + [IMAGE_ID] * 4 + e(pair.prompt) + [EOT_ID, ASSISTANT_ID], e(response) + [EOT_ID]
        sequence = prompt + reply
        assert batch["tokens"][row, :len(sequence) - 1].tolist() == sequence[:-1]
        scored = range(len(prompt) - 1, len(sequence) - 1)  # position p predicts token p + 1
        expected = sum(logits[row, p].log_softmax(-1)[sequence[p + 1]].item() for p in scored)
        assert got[row].item() == pytest.approx(expected, abs=1e-4), row
        noisy = logits.clone()
        noisy[row, [p for p in range(logits.shape[1]) if p not in scored]] += 100 * torch.randn(264)
        assert dpo.sequence_logprobs(noisy, batch["targets"])[row].item() == pytest.approx(expected, abs=1e-4)


def test_a_cut_rejected_response_is_scored_up_to_its_first_token_that_differs_and_no_further():
    """With cut_rejected the rejected response keeps its targets up to and including its first token that differs
    from the chosen response's - found here from the two responses' own tokens, its end marker included - and
    -100 after it; the tokens, the chosen response's targets and the rejected ones before the cut are those of
    the uncut pair."""
    tokenizer = tokenizer_for_tests()
    e = lambda text: pretrain.encode(tokenizer, text) + [EOT_ID]
    cases = [("a small red circle.", "a small blue circle."),      # a wrong word, the rest alike
             ("a blue square.", "a blue square and a red star."),  # a made-up shape after the right one
             ("a blue square and a red star.", "a blue square."),  # a shape left out: the end comes too soon
             ("yes", "no")]
    for chosen, rejected in cases:
        pair = dpo.Pair(0, instruct.CAPTION_REQUEST, chosen, rejected, "test")
        (tokens, chosen_targets), (rejected_tokens, whole) = dpo.render_pair(pair, tokenizer, 4, 64)
        cut = dpo.render_pair(pair, tokenizer, 4, 64, cut_rejected=True)
        assert cut[0] == (tokens, chosen_targets) and cut[1][0] == rejected_tokens
        good, bad = e(chosen), e(rejected)
        first = next(t for t in range(len(bad)) if t >= len(good) or good[t] != bad[t])
        start = whole.index(bad[0])  # where the response's targets begin
        assert whole[start:start + len(bad)] == bad
        assert cut[1][1] == whole[:start + first + 1] + [-100] * (len(whole) - start - first - 1), (chosen, rejected)
        assert 0 < first < len(bad) - 1 or rejected == "no"  # the cut takes something off, but for a one-word answer


def test_reference_gets_no_gradient_and_is_bit_identical_after_training(tmp_path):
    model, tokenizer = tiny_dpo(), tokenizer_for_tests()
    _, batches = tiny_pairs(tokenizer, model.policy.n_image_tokens)
    reference_before = {k: v.clone() for k, v in model.reference.state_dict().items()}
    policy_before = {k: v.clone() for k, v in model.policy.state_dict().items()}
    history = pretrain.train(dict(caption_config(tmp_path, max_iters=3), lr=1e-3, aux_loss_coef=0.01), model, batches)
    assert history[-1][1] < history[0][1]  # the policy learns the four pairs
    for name, value in model.reference.state_dict().items():
        assert torch.equal(value, reference_before[name]), name
    assert all(p.grad is None for p in model.reference.parameters())
    for name, value in model.policy.state_dict().items():  # the LLM and projector train, the encoder does not
        assert torch.equal(value, policy_before[name]) == name.startswith("vit."), name
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert saved["model"].keys() == model.policy.state_dict().keys()  # a plain VLM checkpoint: no reference
    assert len(saved["optimizer"]["state"]) == sum(1 for p in model.policy.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------------------
# Issue 12: command line and infrastructure
# ----------------------------------------------------------------------------------------------------------

def config_comments():
    """{key: meaning} read from config.py's CONFIG lines with a plain regex (a second reading, independent of
    config.config_table's tokenizer): `    key=value,   # meaning`, plus comment-only continuation lines."""
    import re
    text = open(os.path.join(REPO, "config.py")).read()
    block = text[text.index("\nCONFIG = dict(") + 1:text.index("\n)\n", text.index("\nCONFIG = dict("))]
    meanings, last = {}, None
    for line in block.splitlines()[1:]:
        entry = re.match(r"\s+(\w+)=.*?,\s+#\s*(.*)$", line)
        if entry:
            last = entry.group(1)
            meanings[last] = entry.group(2).strip()
        elif re.match(r"\s+#\s*---", line):
            last = None
        elif re.match(r"\s+#", line) and last:
            meanings[last] += " " + line.strip().lstrip("#").strip()
    return meanings


SCRIPTS = {  # script -> (its get_config phase, a key only it, among the scripts, must list)
    "pretrain.py": ("pretrain", "data_dir"), "align.py": ("align", "llm_ckpt"),
    "instruct.py": ("instruct", "align_ckpt"), "sample.py": ("sample", "prompt"),
    "caption.py": ("caption", "image"), "export_hf.py": ("export", "ckpt"), "bench.py": ("bench", "rows"),
    "-m data.prepare_text": ("prepare", "text_source"), "-m data.shapes_world": ("shapes_world", "out_dir"),
}


def test_every_config_key_has_a_meaning_and_help_lists_each_key_a_script_reads(capsys):
    meanings = config_comments()
    assert set(meanings) == set(CONFIG), set(CONFIG) ^ set(meanings)   # every key documented where it is set
    assert all(meanings.values())
    table = {key: (section, meaning) for section, key, meaning in config_module.config_table()}
    assert {key: meaning for key, (_, meaning) in table.items()} == meanings
    for phase, reads in config_module.READS.items():
        with pytest.raises(SystemExit) as stop:
            config_module.get_config(phase, ["--help"])
        assert stop.value.code == 0
        out = capsys.readouterr().out
        config = config_module.get_config(phase, [])
        listed = {line.split("=")[0].strip()[2:] for line in out.splitlines() if line.startswith("  --")}
        expected = {key for key, (section, _) in table.items() if key in reads or section.split(":")[0] in reads}
        assert listed == expected, phase
        for key in expected:
            value = config[key] if config[key] != "" else '""'
            assert f"--{key}={value}" in out and meanings[key] in out, (phase, key)


def test_every_script_prints_its_keys_on_help_and_one_error_line_on_a_bad_key(tmp_path):
    """From an empty folder, so that a script that writes files when asked for help is caught (data.shapes_world
    used to render 12 PNGs into a folder named --help)."""
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    for script, (phase, key) in SCRIPTS.items():
        args = script.split() if script.startswith("-m") else [os.path.join(REPO, script)]
        result = subprocess.run([sys.executable, *args, "--help"], cwd=tmp_path, capture_output=True, text=True,
                                timeout=300, env=env)
        assert result.returncode == 0 and f"  --{key}=" in result.stdout, (script, result.stderr[-500:])
        assert os.listdir(tmp_path) == [], (script, os.listdir(tmp_path))
    for script in ("export_hf.py", "-m data.shapes_world"):  # argparse, and sys.argv[1] as a folder name
        args = script.split() if script.startswith("-m") else [os.path.join(REPO, script)]
        result = subprocess.run([sys.executable, *args, "--nope=1"], cwd=tmp_path, capture_output=True,
                                text=True, timeout=300, env=env)
        assert (result.returncode, result.stderr.strip().splitlines()) == (
            1, ["error: unknown config key --nope (--help lists this script's keys; config.py has all)"]), script
        assert os.listdir(tmp_path) == [], (script, os.listdir(tmp_path))


def test_bench_and_export_take_the_common_key_value_forms(tmp_path, capsys):
    import bench
    bench.main(["--rows", "cuda", "--device=cpu"])  # "--rows cuda" was an unknown key to bench's own parser
    out = capsys.readouterr().out
    assert "skipped: needs CUDA" in out and "training tokens/s" not in out
    with pytest.raises(ConfigError, match="--rows takes a comma-separated subset"):
        bench.main(["--rows=training,gpu"])
    missing = str(tmp_path / "missing.pt")  # export_hf: the positional form and the keys reach the same export
    for argv in ([missing, str(tmp_path / "hf")], [f"--ckpt={missing}", f"--out_dir={tmp_path / 'hf'}"]):
        with pytest.raises(pretrain.TrainingError, match="missing.pt"):
            export_hf.main(argv)


def test_one_error_wrapper_turns_each_kind_of_user_error_into_one_line():
    from data.prepare_text import DataError
    for kind in (ConfigError, DataError, pretrain.TrainingError, export_hf.ExportError):
        def main():
            raise kind("what to do")
        with pytest.raises(SystemExit) as stop:
            config_module.run(main)
        assert stop.value.code == "error: what to do", kind
    with pytest.raises(ZeroDivisionError):  # a bug is not a user error: it keeps its traceback
        config_module.run(lambda: 1 / 0)


def test_the_test_requirements_install_the_runtime_too():
    def requirements(name):
        lines = [line.split("#")[0].strip() for line in open(os.path.join(REPO, name))]
        found = set()
        for line in filter(None, lines):
            found |= requirements(line[3:].strip()) if line.startswith("-r ") else {line}
        return found
    assert requirements("requirements.txt") <= requirements("requirements-test.txt")


def test_the_seed_preset_writes_and_reads_its_own_folders(capsys):
    default = {phase: config_module.get_config(phase, []) for phase in ("pretrain", "align", "instruct")}
    seed = {phase: config_module.get_config(phase, ["--preset=llama4_seed"]) for phase in default}
    assert [default[p]["out_dir"] for p in default] == ["out/pretrain", "out/align", "out/instruct"]
    assert [seed[p]["out_dir"] for p in seed] == ["out/seed/pretrain", "out/seed/align", "out/seed/instruct"]
    assert seed["align"]["llm_ckpt"] == "out/seed/pretrain/ckpt.pt" == seed["pretrain"]["out_dir"] + "/ckpt.pt"
    assert seed["instruct"]["align_ckpt"] == "out/seed/align/ckpt.pt"
    assert default["align"]["llm_ckpt"] == "out/pretrain/ckpt.pt"
    import sample
    with pytest.raises(pretrain.TrainingError, match="out/seed/pretrain/ckpt.pt"):  # sample.py reads the seed's
        sample.main(["--preset=llama4_seed", "--prompt=a red", "--device=cpu"])


def test_progress_prints_count_rate_and_time_left_on_a_clock():
    from data.prepare_text import Progress
    now = [100.0]
    progress = Progress("encoding", 1000, "images", every=10, clock=lambda: now[0])
    lines = []
    import builtins
    real_print = builtins.print
    builtins.print = lambda *a, **k: lines.append(" ".join(map(str, a)))
    try:
        for t, done in ((5, 100), (10, 250), (15, 300), (130, 900)):
            now[0] = 100.0 + t
            progress.update(done)
    finally:
        builtins.print = real_print
    # 250 in 10 s: 25/s, 750 left: 30 s. 900 in 130 s: 6.92/s, 100 left: 14 s.
    assert lines == ["  encoding: 250/1,000 images (25%), 25/s, 30 s left",
                     "  encoding: 900/1,000 images (90%), 7/s, 14 s left"]


def test_feature_cache_stops_before_writing_more_than_the_disk_holds(tmp_path, monkeypatch):
    import collections
    vlm, path = tiny_vlm(), str(tmp_path / "features.npy")
    transform = align.image_transform(dict(TINY, **VISION))
    images = [lambda s=s: shapes_world.render(s, 32) for s in shapes_world.make_scenes("train", 5, seed=0)]
    needed = 5 * 16 * 128 * 2  # 5 images x 16 patch tokens (32 px / 8 px patches, squared) x 128 dims x float16
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(align.shutil, "disk_usage", lambda folder: usage(10**12, 0, needed - 1))
    with pytest.raises(DataError, match=r"needs 0.0 GB .* --cache_features=False"):
        align.compute_features(vlm, images, transform, path, torch.device("cpu"), "A")
    assert not os.path.exists(path)
    monkeypatch.setattr(align.shutil, "disk_usage", lambda folder: usage(10**12, 0, needed))
    assert align.compute_features(vlm, images, transform, path, torch.device("cpu"), "A").shape == (5, 16, 128)
    monkeypatch.setattr(align.shutil, "disk_usage", lambda folder: usage(10**12, 0, 10**10))
    with pytest.raises(DataError, match="needs 35.6 GB for coco.npy, but . has 10.0 GB free"):
        align.check_free_space("coco.npy", 118_287 * 196 * 768 * 2)  # COCO train2017 through ViT-B/16


class FakeProcessGroup:
    """torch.distributed as seen by one process of a job: records barriers among the process's events."""

    def __init__(self, events):
        self.events = events

    def is_initialized(self):
        return True

    def barrier(self):
        self.events.append("barrier")


@pytest.mark.parametrize("local_rank, first", [("0", True), ("1", False)])
def test_each_machines_first_process_caches_features_before_the_barrier(tmp_path, monkeypatch, local_rank, first):
    """A process of global rank 5: the first on its machine (LOCAL_RANK 0) must write the cache before the
    barrier, since without a shared filesystem no other machine's process writes it for it; any other local
    rank reads it after the barrier."""
    events = []
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setattr(torch, "distributed", FakeProcessGroup(events))
    real = align.compute_features
    monkeypatch.setattr(align, "compute_features", lambda *a: events.append("features") or real(*a))
    vlm = tiny_vlm()
    vlm.llm = tiny_model(vocab_size=264, context=64)
    align.CaptionBatches(vlm, tokenizer_for_tests(), caption_config(tmp_path), torch.device("cpu"), rank=5)
    per_split = ["barrier", "features", "barrier"] if first else ["barrier", "barrier", "features"]
    assert events == per_split * 2  # (the first barrier of each split follows its examples, read first per machine)


def test_one_held_out_rule_for_text_captions_and_conversations(tmp_path, monkeypatch):
    """With the rule's constant changed, every source follows it: none may hard-code its own 50."""
    from PIL import Image
    from data import prepare_text
    monkeypatch.setattr(prepare_text, "VAL_EVERY", 3)
    train, val = prepare_text.split_documents([f"doc {i}" for i in range(7)], dict(text_source="test"))
    assert val == ["doc 2", "doc 5"]
    for i in range(7):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / f"{i}.png")
    records = [{"id": i, "image": f"{i}.png", "conversations": [{"from": "human", "value": "<image>q"},
                                                                 {"from": "gpt", "value": str(i)}]} for i in range(7)]
    (tmp_path / "chat.json").write_text(json.dumps(records))
    config = dict(instruct_source=str(tmp_path / "chat.json"), image_folder=str(tmp_path))
    answers = lambda split: [turns[0][1] for _, turns in instruct.llava_conversations(config, split).pairs]
    assert (answers("train"), answers("val")) == (["0", "1", "3", "4", "6"], ["2", "5"])


def test_shapes_pairs_come_from_training_scenes_and_made_up_captions_differ_by_one_thing(tmp_path):
    """The chosen caption of every pair names its scene, and hashes into the split the pairs were made for:
    training pairs never show a held-out scene. A made-up caption parses and differs from the truth in exactly
    the detail it says it made up."""
    model, tokenizer = tiny_dpo(), tokenizer_for_tests()
    cfg = caption_config(tmp_path, pref_scenes=16, pref_samples=1, caption_corruptions=3)
    data = dpo.preference_data(model.reference, tokenizer, cfg, torch.device("cpu"), 0)
    for split, (pairs, features) in data.items():
        assert len(features) == (16 if split == "train" else 2)  # held-out scenes: an eighth as many
        assert {p.origin.split()[0] for p in pairs} <= {"own", "made-up"}
        for pair in pairs:
            assert pair.chosen != pair.rejected
            if pair.prompt == instruct.CAPTION_REQUEST:
                truth = shapes_world.parse_caption(pair.chosen)
                assert shapes_world.split_of({"shapes": truth}) == split
            if pair.origin.startswith("made-up caption"):
                made_up, what = shapes_world.parse_caption(pair.rejected), pair.origin.split(maxsplit=2)[2]
                changed = [shape for shape in made_up if shape not in truth]
                assert len(changed) == 1  # one shape made up, or one shape changed
                if what == "extra shape":
                    assert len(made_up) == len(truth) + 1 and all(shape in made_up for shape in truth)
                    assert (changed[0]["color"], changed[0]["kind"]) not in {(s["color"], s["kind"]) for s in truth}
                else:  # every other attribute of every shape is as it was
                    others = lambda shapes: sorted(tuple(v for k, v in sorted(s.items()) if k != what) for s in shapes)
                    assert len(made_up) == len(truth) and others(made_up) == others(truth)
        counts = {p.origin.split()[1] for p in pairs if p.origin.startswith("made-up")}
        assert counts == {"caption", "color", "kind", "count", "position", "exists"} or split == "val"
        # Held-out pairs ask each scene one question of each type (phase 3's, which answer accuracy asks);
        # training pairs add the harder binding questions.
        asked = {}
        for pair in pairs:
            if pair.prompt != instruct.CAPTION_REQUEST:
                asked.setdefault(pair.image, set()).add(pair.prompt)
        most = max(len(prompts) for prompts in asked.values())
        assert most <= 5 if split == "val" else most > 5


def test_binding_questions_are_answered_by_their_scene():
    """Every answer of shapes_world.binding_questions, checked against the scene by a reading of the question
    written here: "is there a shape <place>" is yes exactly when a shape is there, and one such question asks
    an empty cell (no) and one an occupied cell (yes); "where is the <name>" names one shape alone and answers
    its cell, and every shape that no other shape shares its name with (by size, colour and kind, as counted
    here) is asked about."""
    places = {phrase: cell for cell, phrase in shapes_world.PLACES.items()}
    rng, where_asked = random.Random(0), 0
    for scene in shapes_world.make_scenes("train", 400, seed=5):
        shapes = scene["shapes"]
        asked = shapes_world.binding_questions(scene, rng)
        exists = [(q, a) for q, a, t in asked if t == "exists"]
        assert [a for _, a in exists] == ["no", "yes"]
        named = []
        for question, answer, qtype in asked:
            place = re.fullmatch(r"is there a shape (.+)\?", question)
            where = re.fullmatch(r"(?:where is|in which part of the picture is) the (.+)\?", question)
            if place:
                assert answer == ("yes" if any(s["position"] == places[place[1]] for s in shapes) else "no")
            else:
                words = where[1].split()
                matching = [s for s in shapes if all(w in (s["size"], s["color"], s["kind"]) for w in words)]
                assert qtype == "position" and len(matching) == 1 and answer == matching[0]["position"]
                named.append(matching[0]["position"])
        # A shape can be named alone when no other shape has its size, colour and kind all three.
        nameable = [s["position"] for s in shapes
                    if not any(o is not s and (o["size"], o["color"], o["kind"]) == (s["size"], s["color"], s["kind"])
                               for o in shapes)]
        assert named == nameable
        where_asked += len(named)
    assert where_asked > 600


def test_responses_continuing_a_shared_image_prefix_equal_each_prompt_run_whole():
    """dpo.respond runs each image's tokens once into a KV cache and continues a copy of it with each prompt
    about that image (KVCache.rows, generate(cache=...)): the same greedy responses as re-running each whole
    prompt at every step, across blocks of images, prompts of several lengths, and captions."""
    vlm, tokenizer = tiny_dpo().policy.eval(), tokenizer_for_tests()
    features = torch.randn(5, 16, 128)
    prompts = ["is there a red circle?", "where is the small blue square?", "what color is it?", instruct.CAPTION_REQUEST]
    asks = [(row, prompt) for row in (3, 0, 4, 1, 0) for prompt in prompts[row % 3:]]  # image 0 in two blocks
    got = dpo.respond(vlm, features, asks, tokenizer, images_at_once=2)
    for (row, prompt), text in zip(asks, got):
        before, after = instruct.question_prefix(tokenizer, prompt)
        prefix = torch.tensor([*before, *[IMAGE_ID] * vlm.n_image_tokens, *after])
        steps = min(64 if prompt == instruct.CAPTION_REQUEST else 8, vlm.config["context"] - len(prefix))
        assert text == tokenizer.decode(greedy_by_full_recompute(vlm, prefix, features[row], steps)).strip()
    assert len(set(got)) > len(prompts)  # not one response for everything


def test_a_made_up_answer_that_the_model_also_gave_is_one_pair(tmp_path, monkeypatch):
    """A model that answers "yes" to everything: each existence question makes exactly one pair, the truth "no"
    against the model's own "yes", or the truth "yes" against a made-up "no" - never the same pair twice, which
    would tip the yes/no balance of the pairs towards "no"."""
    monkeypatch.setattr(dpo, "respond", lambda vlm, features, asks, tokenizer, **sampling: ["yes"] * len(asks))
    model, tokenizer = tiny_dpo(), tokenizer_for_tests()
    cfg = caption_config(tmp_path, pref_scenes=16, pref_samples=1)
    pairs, _ = dpo.shapes_preferences(model.reference, tokenizer, cfg, "train", torch.device("cpu"), 0)
    exists = [pair for pair in pairs if pair.origin.endswith(" exists")]
    prompts = [(pair.image, pair.prompt) for pair in exists]
    assert len(set(prompts)) == len(prompts) > 16  # the binding questions too: more than one a scene
    assert {(pair.chosen, pair.rejected, pair.origin) for pair in exists} == {("no", "yes", "own exists"),
                                                                               ("yes", "no", "made-up exists")}


def test_dpo_evaluation_reads_the_margins_of_the_val_loss_pass(tmp_path):
    """evaluate_dpo takes the held-out margins from pretrain.evaluate's pass just before (as in training) rather
    than running the pairs again: the same pref acc and margin as when it runs them itself."""
    model, tokenizer = tiny_dpo(), tokenizer_for_tests()
    cfg = caption_config(tmp_path, pref_scenes=16, pref_samples=1, eval_iters=3)
    data = dpo.preference_data(model.reference, tokenizer, cfg, torch.device("cpu"), 0)
    batches = dpo.PreferenceBatches(data, tokenizer, model.policy.n_image_tokens, 64, cfg, torch.device("cpu"))
    alone = dpo.evaluate_dpo(model, batches, tokenizer)
    pretrain.evaluate(model, batches, contextlib.nullcontext())
    assert sum(map(len, model.eval_margins)) == batches.eval_pairs() == 12
    after_val_loss = dpo.evaluate_dpo(model, batches, tokenizer)
    assert after_val_loss == pytest.approx(alone, abs=1e-6) and alone["margin"] != 0 and model.eval_margins == []


def test_hallucination_counts_captions_that_name_a_colour_and_kind_absent_from_the_scene():
    """Hand-written captions of one scene, each with its verdict by hand: a missing shape or a cut caption is
    not a hallucination; a (colour, kind) pair that is not in the picture is, even when each word of it is."""
    scene = {"shapes": [{"kind": "star", "color": "blue", "size": "large", "position": "top"},
                        {"kind": "circle", "color": "red", "size": "small", "position": "center"}]}
    cases = [("a large blue star at the top and a small red circle in the center.", 0),
             ("a small red circle in the center.", 0),                 # a shape left out
             ("a large blue star at the top and a small red circ", 0),  # cut short
             ("", 0),
             ("a small blue circle in the center.", 1),                # blue and circle, but no blue circle
             ("a large red star at the top.", 1),
             ("a large blue star at the top, a small red circle in the center and a green square on the left.", 1)]
    for text, expected in cases:
        assert dpo.hallucination([(text, scene)]) == expected, text
    assert dpo.hallucination([(text, scene) for text, _ in cases]) == pytest.approx(3 / 7)


def write_rlaif(tmp_path, n_good=60):
    """A parquet file in the format of HuggingFaceH4/rlaif-v_formatted: n_good good records (one with its image
    by path), then six bad ones."""
    import datasets
    scenes = write_images(tmp_path / "imgs", n_good)
    user = lambda text: [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": text}]}]
    reply = lambda text: [{"role": "assistant", "content": [{"type": "text", "text": text}]}]
    image = lambda i: {"bytes": (tmp_path / "imgs" / f"img{i}.png").read_bytes(), "path": None}
    record = lambda images, chosen, rejected: dict(images=images, prompt=user("what is in the picture?"),
                                                    chosen=reply(chosen), rejected=reply(rejected))
    records = [record([image(i)], shapes_world.caption(s), "a large purple star in the center.")
               for i, s in enumerate(scenes)]
    records[1]["images"] = [{"bytes": None, "path": str(tmp_path / "imgs" / "img1.png")}]
    png = (tmp_path / "imgs" / "img0.png").read_bytes()
    records += [record([{"bytes": None, "path": str(tmp_path / "gone.png")}], "a", "b"),
                record([{"bytes": b"this is not a picture", "path": None}], "a", "b"),
                record([{"bytes": png[:60], "path": None}], "a", "b"),
                record([], "a", "b"),
                record([image(0)], "", "b"),
                record([image(0)], "the same", "the same")]
    path = tmp_path / "rlaif.parquet"
    datasets.Dataset.from_list(records).to_parquet(str(path))
    return path, scenes


def test_rlaif_v_parquet_skips_bad_records_loudly_and_trains_one_step(tmp_path, capsys):
    path, scenes = write_rlaif(tmp_path)
    cfg = caption_config(tmp_path, max_iters=1, pref_source=str(path))
    model, tokenizer = tiny_dpo(), tokenizer_for_tests()
    data = dpo.preference_data(model.reference, tokenizer, cfg, torch.device("cpu"), 0)
    out = capsys.readouterr().out
    for number, reason in [(60, "no such image"), (61, "the image cannot be decoded"), (62, "the image cannot be decoded"),
                           (63, "no image"), (64, "empty chosen response"), (65, "chosen and rejected are the same")]:
        assert f"skipping record {number} of {path} (train): {reason}" in out, (number, out)
    assert "skipped 6 of 65 train records" in out
    (train_pairs, train_features), (val_pairs, _) = data["train"], data["val"]
    assert (len(train_pairs), len(val_pairs)) == (59, 1)  # record 49 is held out
    assert val_pairs[0].chosen == shapes_world.caption(scenes[49])
    assert train_pairs[1].prompt == "<image> what is in the picture?" and train_pairs[1].chosen == shapes_world.caption(scenes[1])
    features = model.reference.image_features(align.image_transform(cfg)(align.open_image(str(tmp_path / "imgs" / "img1.png")))[None])
    torch.testing.assert_close(torch.from_numpy(train_features[1].astype(np.float32)), features[0], atol=1e-2, rtol=1e-2)
    batches = dpo.PreferenceBatches(data, tokenizer, model.policy.n_image_tokens, 64, cfg, torch.device("cpu"))
    grads = gradients_at_step(lambda: (pretrain.train(cfg, model, batches), model)[1])
    assert grads and not any(name.startswith("policy.vit.") for name in grads)
    assert grads["policy.projector.fc1.weight"].abs().sum() > 0
    assert grads["policy.llm.layers.0.attn.q_proj.weight"].abs().sum() > 0


def test_dpo_cli_logs_step_zero_and_after_and_caption_reads_its_checkpoint(tiny_vlm_ckpts, tmp_path):
    _, instruct_ckpt, _ = tiny_vlm_ckpts
    out = tmp_path / "dpo"
    args = ["dpo.py", f"--instruct_ckpt={instruct_ckpt}", f"--out_dir={out}", "--max_iters=2", "--eval_interval=2",
            "--eval_iters=1", "--batch_size=4", "--pref_scenes=6", "--eval_images=4", "--pref_samples=1",
            "--log_interval=1", "--device=cpu", "--nll_coef=0"]  # without the LM term, step 0 is exactly ln 2
    result = run(*args)
    assert result.returncode == 0, result.stderr
    evals = [line for line in result.stdout.splitlines() if line.startswith("eval step")]
    assert len(evals) == 2 and evals[0].startswith("eval step 0: val loss 0.6931 |"), result.stdout  # ln 2
    assert "pref acc 0.000 | margin 0.000" in evals[0] and evals[1].startswith("eval step 2:")
    # one val scene gives more than eval_iters x batch_size = 4 pairs, and the log says which ones pref acc counts
    assert "pref acc and margin count the first 4 val pairs" in result.stdout, result.stdout
    for name in ("pref acc", "margin", "answer all", "answer exists", "answer position", "caption exact",
                 "hallucination"):
        assert all(f"| {name} " in line for line in evals), name
    shapes_world.render(shapes_world.make_scenes("test", 1)[0], 64).save(tmp_path / "scene.png")
    for prompt in ([], ["--prompt", "is there a red circle?"]):
        ok = run("caption.py", str(tmp_path / "scene.png"), f"--ckpt={out / 'ckpt.pt'}", "--max_new_tokens=5", *prompt)
        assert ok.returncode == 0 and ok.stderr == "", ok.stderr
    assert_clean_error(run("dpo.py", f"--instruct_ckpt={tmp_path / 'none.pt'}", f"--out_dir={tmp_path / 'a'}"),
                       "python instruct.py")
    assert_clean_error(run(*args[:1], f"--instruct_ckpt={instruct_ckpt}", f"--out_dir={tmp_path / 'a'}",
                           "--pref_source=nothing.parquet"), "no .parquet files")
    assert_clean_error(run(*args[:1], f"--instruct_ckpt={instruct_ckpt}", f"--out_dir={tmp_path / 'a'}",
                           "--pref_source=hf", env={"HF_HUB_OFFLINE": "1"}), "--pref_source=")
    assert not (tmp_path / "a").exists()
