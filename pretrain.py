"""Phase 1: pretrain a Llama-4-style decoder language model on text.

    python pretrain.py                          # Shapes World on the CPU, a few minutes
    python pretrain.py --preset=llama4_seed     # the seed's recipe: cosmopedia-v2, 20k steps, bf16 on CUDA
    torchrun --standalone --nproc_per_node=2 pretrain.py   # the same with DistributedDataParallel

Read top to bottom, this file is the course: the tokenizer and the data loader, then the model one part at a
time (RMSNorm, RoPE, attention with GQA and chunking, SwiGLU, mixture of experts, the block, the whole model,
the KV cache and generation), then the training loop that phases 2 and 3 reuse, then main.
Where sizes are quoted, both models are named: the default (dim 128, 4 layers, 4 query and 2 key/value heads
of width 64, 8 experts, top-2) and the seed's recipe (dim 768, 12 layers, 12 and 4 heads of width 64, 8
experts, top-2).
"""
import contextlib
import functools
import math
import os
import random
import time
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from config import ConfigError, UserError, get_config, run
from data.prepare_text import BOS_ID, EOS_ID, EOT_ID, DataError, data_settings, prepare


class TrainingError(UserError, RuntimeError):
    """A run that cannot go on (a non-finite loss, a checkpoint that does not fit); the message says why."""


# ----------------------------------------------------------------------------------------------------------
# Tokenizer and data
# ----------------------------------------------------------------------------------------------------------

def load_tokenizer(source):
    """A `tokenizers.Tokenizer` from a prepared data folder or from the JSON string kept in a checkpoint."""
    from tokenizers import Tokenizer
    if os.path.isdir(source):
        return Tokenizer.from_file(os.path.join(source, "tokenizer.json"))
    return Tokenizer.from_str(source)


def encode(tokenizer, text):
    """Token ids of `text` without any special tokens added."""
    return tokenizer.encode(text, add_special_tokens=False).ids


def ensure_text_data(config):
    """Prepare config["data_dir"] from config["text_source"] if it has not been prepared yet."""
    meta_path = os.path.join(config["data_dir"], "meta.json")
    if not os.path.exists(meta_path):
        prepare(config)
    import json
    with open(meta_path) as f:
        meta = json.load(f)
    if meta["vocab_size"] != config["vocab_size"]:
        raise DataError(f"{config['data_dir']} was prepared with vocab_size={meta['vocab_size']}, the config "
                        f"says {config['vocab_size']}; pass --vocab_size={meta['vocab_size']} or another --data_dir")
    wanted = data_settings(config)
    recorded = dict(meta.get("settings", {}), text_source=meta["source"])  # older folders record the source only
    if recorded["text_source"] == "shapes":
        recorded.setdefault("shapes_corpus", 1)  # made before the Shapes World corpus had a version
    made = {key: recorded.get(key, value) for key, value in wanted.items()}
    if made != wanted:
        differ = ", ".join(f"{key}={made[key]} (now {wanted[key]})" for key in wanted if made[key] != wanted[key])
        raise DataError(f"{config['data_dir']} was prepared with {differ}; pass another --data_dir, or delete "
                        f"the folder to prepare it again")
    return meta


class TextBatches:
    """Training windows of context + 1 tokens from the memory-mapped token streams.

    nanoGPT draws each window from a random place in the stream (`piece=0`). With `piece` set (main passes
    attn_chunk, or the whole context when attn_chunk is 0, when config["doc_aligned"] is on), a window is
    context // piece pieces, and each piece starts at a document's first token. That matters for a model that
    learns to copy: a RoPE layer sees only its own chunk, so a document cut by a chunk border cannot be restated
    from what it said before the border.
    Shapes World's documents are 75 tokens on average; drawn from anywhere, only a third of their tokens lie
    in a document that its chunk of 128 holds whole, aligned two thirds, and phase 1 learns to copy in far
    fewer steps (docs/research.md, "Every chunk starts at a document").

    Each process (DDP rank) has its own seeded generator, so ranks read different windows; the generator's
    state is saved in the checkpoint, so a resumed run draws exactly the windows the uninterrupted run would.
    """

    def __init__(self, data_dir, context, batch_size, device, seed=0, rank=0, eval_iters=20, piece=0):
        self.data_dir, self.context, self.batch_size, self.device = data_dir, context, batch_size, device
        self.eval_iters, self.seed, self.rank = eval_iters, seed, rank
        self.piece = piece if piece and context % piece == 0 else context  # a piece that does not divide: whole
        self.aligned = bool(piece)
        self.generator = torch.Generator().manual_seed(seed + rank)
        self.doc_starts, lengths = {}, {}
        for split in ("train", "val"):
            tokens = self._tokens(split)
            lengths[split] = len(tokens)
            if len(tokens) <= context + 1:
                raise DataError(f"{data_dir}/{split}.bin holds fewer than context + 1 = {context + 1} tokens; "
                                f"prepare more text or lower --context")
            if self.aligned:  # where a piece may start: a document's first token, with piece + 1 tokens after it
                starts = np.flatnonzero(tokens == BOS_ID)
                self.doc_starts[split] = starts[starts < len(tokens) - self.piece - 1]
                if not len(self.doc_starts[split]):
                    raise DataError(f"{data_dir}/{split}.bin has no document start with {self.piece} tokens after "
                                    f"it; pass --doc_aligned=false")
        if self.aligned and rank == 0:
            mean = lengths["train"] / len(self.doc_starts["train"])
            if mean > self.piece:
                print(f"note: the documents average {mean:,.0f} tokens, more than a piece of {self.piece}: aligned "
                      f"windows train only on their first {self.piece}; --doc_aligned=false draws windows from "
                      f"anywhere", flush=True)

    def _tokens(self, split):
        # A fresh memmap per batch keeps memory flat over long runs (nanoGPT does the same).
        return np.memmap(os.path.join(self.data_dir, f"{split}.bin"), dtype=np.uint16, mode="r")

    def next(self, split="train", generator=None):
        tokens, generator = self._tokens(split), generator or self.generator
        n_pieces = self.batch_size * self.context // self.piece
        if self.aligned:  # a random document start for each piece
            starts = self.doc_starts[split][torch.randint(len(self.doc_starts[split]), (n_pieces,),
                                                          generator=generator).numpy()]
        else:             # anywhere in the stream
            starts = torch.randint(len(tokens) - self.piece - 1, (n_pieces,), generator=generator).tolist()
        pieces = np.stack([tokens[s:s + self.piece + 1] for s in starts]).astype(np.int64)
        # Each piece's targets are its own tokens shifted by one; the last one is the token after the piece.
        both = torch.from_numpy(np.stack([pieces[:, :-1], pieces[:, 1:]]).reshape(2, self.batch_size, self.context))
        if self.device.type == "cuda":  # one copy to the device for inputs and targets together
            both = both.pin_memory().to(self.device, non_blocking=True)
        return dict(tokens=both[0], targets=both[1])  # (B, T) each

    def eval_batches(self):
        """The same validation windows at every evaluation, so successive val losses are comparable."""
        generator = torch.Generator().manual_seed(10_000 + self.seed + self.rank)
        return [self.next("val", generator) for _ in range(self.eval_iters)]

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])


# ----------------------------------------------------------------------------------------------------------
# The model. Llama 4's text decoder, with the semantics of Hugging Face transformers' Llama4TextModel.
# ----------------------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """Root-mean-square norm: x / rms(x) * weight. Unlike LayerNorm it neither centres nor adds a bias,
    which is cheaper and works as well. Computed in fp32 for stability, then cast back."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_normalize(x, self.eps) * self.weight


def rms_normalize(x, eps):
    """x / sqrt(mean(x^2) + eps) over the last dimension, in fp32. Without a weight this is Llama 4's "L2 norm"
    of queries and keys on RoPE layers (see Attention.project)."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


def rope_angles(head_dim, max_len, theta):
    """The rotation of each position, laid out to match the interleaved pairs (dims 2i, 2i+1) of a head:
    pair i turns by pos * theta^(-2i / head_dim), fast for the first pairs and slow for the last.
    Returns cos (max_len, head_dim) = [c0, c0, c1, c1, ...] and sin = [-s0, s0, -s1, s1, ...]: each pair's
    sine carries the signs of the rotation, so apply_rope needs no subtraction."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (max_len, head_dim / 2)
    cos, sin = torch.cos(angles), torch.sin(angles)
    return cos.repeat_interleave(2, dim=-1), torch.stack((-sin, sin), dim=-1).flatten(-2)


def apply_rope(x, cos, sin):
    """Rotary position embedding on *interleaved* pairs: dims (2i, 2i+1) of a head are the two coordinates
    (x0, x1) of one point in a plane, turned by its pair's angle - the layout of Meta's Llama code, which
    treats each pair as a complex number x0 + i x1 and multiplies it by e^(i angle). (Hugging Face's Llama
    pairs dim i with dim i + head_dim/2 instead: the same idea, another layout of the weights.)
    Rotating q and k by their positions makes q·k depend only on the distance between them.

    The rotation (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin) is written x * cos + flip(x) * sin, where flip
    swaps the two dims of every pair and sin = [-s, s] from rope_angles holds the signs. Worked in 2-D, the
    point (3, 4) turned by 90 degrees (cos 0, sin 1):
        x * cos        = (3, 4) * (0, 0)   = ( 0, 0)
        flip(x) * sin  = (4, 3) * (-1, 1)  = (-4, 3)
        sum                                = (-4, 3) = (3 cos 90 - 4 sin 90, 4 cos 90 + 3 sin 90), as it should
    Four whole-tensor ops in fp32, no complex numbers. x: (B, T, heads, head_dim); cos, sin: (T, head_dim), or
    (B, T, head_dim) when each row has its own positions (Attention's `queries`)."""
    x32 = x.float()
    flipped = x32.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)      # (x1, x0) in every pair
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)                 # broadcast over heads
    return (x32 * cos + flipped * sin).type_as(x)


def head_dim_of(config):
    """Width of one attention head: config["head_dim"], or dim // n_heads when that is 0."""
    return config.get("head_dim") or config["dim"] // config["n_heads"]


@functools.lru_cache(maxsize=64)
def attention_mask(length, offset, chunk, device):
    """Boolean (length, offset + length) mask, True where a query may look: keys at or before the query and,
    when `chunk` is set, in the same chunk of `chunk` positions. Built once per shape and cached.

    The two kinds of layer for T = 8 positions and chunk = 4 (x: the query in that row sees the key):

        RoPE layer (chunk 4)          NoPE layer (no chunks)
        key    0 1 2 3 4 5 6 7        key    0 1 2 3 4 5 6 7
        q 0    x . . . . . . .        q 0    x . . . . . . .
        q 1    x x . . . . . .        q 1    x x . . . . . .
        q 2    x x x . . . . .        q 2    x x x . . . . .
        q 3    x x x x . . . .        q 3    x x x x . . . .
        q 4    . . . . x . . .        q 4    x x x x x . . .
        q 5    . . . . x x . .        q 5    x x x x x x . .
        q 6    . . . . x x x .        q 6    x x x x x x x .
        q 7    . . . . x x x x        q 7    x x x x x x x x

    The RoPE layer's mask is two independent causal triangles: query 4 starts afresh and sees only itself.
    Information crosses chunks only through the NoPE layers."""
    query_pos = torch.arange(offset, offset + length, device=device)[:, None]
    return visible(query_pos, torch.arange(offset + length, device=device), chunk)


def visible(query_pos, key_pos, chunk):
    """True where a query at query_pos may look at a key at key_pos (broadcast against each other): the key is
    at or before the query and, when `chunk` is set, in the same chunk."""
    mask = key_pos <= query_pos
    if chunk:
        mask &= (key_pos // chunk) == (query_pos // chunk)
    return mask


def attention_path(T, offset, chunk, cached):
    """Which of four ways runs attention for T new queries at positions offset .. offset + T - 1 (chunk: the
    layer's attn_chunk, None on NoPE layers; cached: a KV cache holds the earlier positions). All four give
    what attention_mask draws; they differ in speed, since the fast kernels want no mask at all:

      path     situation                                          how
      folded   training: T whole chunks from position 0, no        fold the chunks into the batch (a free
               cache (RoPE layers only)                            reshape), then plain causal attention
      causal   from position 0, at most one chunk (or a NoPE       plain causal attention
               layer, which has no chunks)
      decode   one new token after a cached prefix                 the cache from the token's chunk start
                                                                   on, all visible: no mask
      masked   anything else: a prompt piece after a cached        an explicit mask from attention_mask
               prefix, a prompt that is not whole chunks

    The chunk boundary while decoding, with chunk 512: the token at position 511 sees keys 0..511 on every
    layer; the token at position 512 opens the second chunk, so on RoPE layers it sees only itself (its chunk
    starts at 512 // 512 * 512 = 512) and on NoPE layers all 513 keys 0..512."""
    if not cached and offset == 0 and chunk and T > chunk and T % chunk == 0:
        return "folded"
    if offset == 0 and (chunk is None or T <= chunk):
        return "causal"
    if T == 1:
        return "decode"
    return "masked"


def folded_chunk_attention(q, k, v, chunk):
    """Causal attention within chunks, for T a multiple of chunk: each chunk is an independent causal sequence,
    so it becomes a row of the batch. q (B, T, n_heads, head_dim), k and v (B, T, n_kv_heads, head_dim)."""
    B, T = q.shape[:2]
    fold = lambda t: t.reshape(B * T // chunk, chunk, *t.shape[2:]).transpose(1, 2)  # (B*T/chunk, heads, chunk, hd)
    out = F.scaled_dot_product_attention(fold(q), fold(k), fold(v), is_causal=True, enable_gqa=True)
    return out.transpose(1, 2).reshape(B, T, *q.shape[2:])             # (B, T, n_heads, head_dim)


class Attention(nn.Module):
    """Grouped-query self-attention, in one of Llama 4's two kinds of layer (iRoPE).

    GQA: the n_heads query heads share n_kv_heads key/value heads, in groups of n_heads // n_kv_heads (the
    default model: 4 and 2, groups of 2; the seed's recipe: 12 and 4, groups of 3), which shrinks the KV cache
    by that factor at almost no loss. `enable_gqa=True` lets the kernel read each K/V head once per group; it
    computes exactly what repeating them would, k.repeat_interleave(n_heads // n_kv_heads, dim=1) and the same
    for v, so that query head h uses K/V head h // group (a test compares the two).
    RoPE layers (3 of every 4): rotate q and k by position, normalise them (the weightless "L2 norm"), and
    attend only within the query's chunk of `attn_chunk` positions - local, cheap, and position-aware.
    NoPE layers (every 4th): no rotation, no q/k norm, attend over the whole causal context - global mixing
    that never sees positions it was not trained on, which is what lets Llama 4 stretch to long contexts.
    There the query is scaled by a temperature that grows with log(position) to keep attention sharp over
    very long contexts; it is exactly 1 below position floor_scale - 1 (8191), so it matters only there.
    """

    def __init__(self, config, use_rope, layer):
        super().__init__()
        self.n_heads, self.n_kv_heads = config["n_heads"], config["n_kv_heads"]
        self.head_dim = head_dim_of(config)
        self.use_rope, self.chunk, self.eps = use_rope, config["attn_chunk"], config["norm_eps"]
        self.attn_scale, self.floor_scale = config["attn_scale"], config["floor_scale"]
        self.layer = layer  # the block's index: the KV cache keeps this layer's keys and values under it
        dim, kv_dim = config["dim"], self.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(dim, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dim, bias=False)

    def forward(self, x, rope, cache=None, offset=0, queries=None):
        """x: (B, T, dim) at positions offset .. offset + T - 1; the earlier ones are in `cache` when decoding.
        queries: (B, K) positions, or None for all T. When given (training, no cache), only those positions ask:
        the keys and values are still every position's, the output is (B, K, dim). See Transformer.forward."""
        B, T, _ = x.shape
        q, k, v = self.project(x, rope, offset, queries)
        chunk = self.chunk if self.use_rope else None                   # NoPE layers see the whole context
        if queries is not None:  # each row's own query positions: a mask drawn from them, as attention_mask's
            mask = visible(queries[:, None, :, None], torch.arange(T, device=x.device), chunk)  # (B, 1, K, T)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=mask, enable_gqa=True)
            return self.o_proj(out.transpose(1, 2).reshape(B, queries.shape[1], -1))
        path = attention_path(T, offset, chunk, cached=cache is not None)
        if path == "folded":
            out = folded_chunk_attention(q, k, v, chunk)                # (B, T, n_heads, head_dim)
        else:
            k, v = k.transpose(1, 2), v.transpose(1, 2)                 # (B, n_kv_heads, T, head_dim)
            if cache is not None:
                k, v = cache.update(self.layer, k, v, offset)           # (B, n_kv_heads, offset + T, head_dim)
            if path == "decode":  # the new token sees every cached key of its own chunk: keep just those
                start = offset // chunk * chunk if chunk else 0
                k, v = k[:, :, start:], v[:, :, start:]
            mask = attention_mask(T, offset, chunk, x.device) if path == "masked" else None
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask,
                                                 is_causal=path == "causal", enable_gqa=True)
            out = out.transpose(1, 2)                                   # (B, T, n_heads, head_dim)
        return self.o_proj(out.reshape(B, T, -1))

    def project(self, x, rope, offset, queries=None):
        """q (B, T, n_heads, head_dim), k and v (B, T, n_kv_heads, head_dim), positioned as this layer's kind wants;
        with `queries` (B, K) q is (B, K, n_heads, head_dim), of those positions only."""
        B, T, _ = x.shape
        x_q = x if queries is None else rows_at(x, queries)
        q = self.q_proj(x_q).view(*x_q.shape[:2], self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.use_rope:
            cos, sin = rope[0][offset:offset + T], rope[1][offset:offset + T]   # (T, head_dim) each
            k = apply_rope(k, cos, sin)
            if queries is not None:                                     # each row's own: (B, K, head_dim)
                cos, sin = rope[0][queries], rope[1][queries]
            q = apply_rope(q, cos, sin)
            # Llama 4's "L2 norm" (use_qk_norm): every head's q and k divided by its root-mean-square, with no
            # learnt weight, so each has length sqrt(head_dim) and every attention logit q·k / sqrt(head_dim)
            # stays within ±sqrt(head_dim): no logit can run away in training. A rotation keeps lengths, so
            # normalising after it gives the same vectors as before it, up to rounding; after is where Llama 4
            # puts it. Only RoPE layers have it (Meta does not say why): the global NoPE layers keep logits
            # that may grow as sharp as picking one key out of a long context needs, and get a temperature.
            # The bound is why the head width matters in a small model: with 32-dim heads no RoPE-layer logit
            # passes ±5.7, too blunt to pick one earlier word out of dozens, and the default model copied a
            # restated shape kind at 0.46 nats after 1,000 steps; with 64-dim heads (±8; Llama 4's 128: ±11.3)
            # it reached 0.06 (the copy test; docs/research.md).
            q, k = rms_normalize(q, self.eps), rms_normalize(k, self.eps)
        elif offset + T >= self.floor_scale:  # below that every position's temperature is exactly 1
            positions = (torch.arange(offset, offset + T, device=x.device) if queries is None else queries).float()
            temperature = 1 + self.attn_scale * torch.log(torch.floor((positions + 1) / self.floor_scale) + 1)
            q = (q * temperature[..., None, None]).type_as(q)
        return q, k, v


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). The gate decides, per hidden unit, how much of `up` passes."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    """n_experts SwiGLU networks stored as stacked weights: gate_proj and up_proj (n_experts, dim, hidden),
    down_proj (n_experts, hidden, dim); expert e is slice [e] of each."""

    def __init__(self, n_experts, dim, hidden):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.up_proj = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden, dim))

    def expert(self, e, x):
        """Expert e on rows x (rows, dim) -> (rows, dim): the SwiGLU of FeedForward with its own weights."""
        return (F.silu(x @ self.gate_proj[e]) * (x @ self.up_proj[e])) @ self.down_proj[e]


class MoE(nn.Module):
    """Mixture of experts: a router picks top_k of n_experts SwiGLU networks for each token, and a shared
    expert sees every token. Parameters grow with n_experts, compute only with top_k: that is the point.

    The idea, one line of forward each:
      router    a linear layer scores every expert for every token
      top-k     each token keeps its top_k experts, each with a gate = sigmoid(its score)
      experts   each chosen expert runs on the token's input scaled by its gate
      combine   the token's output is the shared expert's plus the sum of its top_k experts'
    experts_loop writes the experts step as the idea reads, one expert at a time; routed_experts computes the
    same with sorted rows and grouped matmuls (the speed devices after this class), and a test compares them.

    Gating, Llama 4 against Mixtral: Mixtral takes a softmax over the top_k scores, so the chosen experts
    share one unit of weight, and scales each expert's *output*: sum_e g_e * expert_e(x). Llama 4 takes an
    independent sigmoid of each chosen score (no renormalisation: a token may lean on all of its experts, or
    on none and leave the work to the shared expert) and scales the expert's *input*: sum_e expert_e(g_e * x).
    A SwiGLU multiplies two projections of its input, so its output grows about as gate^2 (exactly, were
    silu a ReLU): not the same as scaling the output.

    The balancing loss (Switch Transformer's) is n_experts * sum_i f_i * P_i, f_i the share of routed slots
    sent to expert i and P_i the router's mean probability of i. The counts behind f_i have no gradient; P_i
    carries it, and P_i needs a distribution over all the experts - the sigmoids are not one, they need not
    sum to 1 and could all rise together - so P is a softmax over the same router scores. Its gradient moves
    probability from busy experts to idle ones; the loss is 1 when the load is even and grows as the router
    collapses onto a few experts.
    """

    def __init__(self, config):
        super().__init__()
        self.n_experts, self.top_k = config["n_experts"], config["top_k"]
        if config["dim"] % 8 or config["moe_hidden"] % 8:
            raise ConfigError("dim and moe_hidden must be multiples of 8 (grouped matmuls need 16-byte strides)")
        self.router = nn.Linear(config["dim"], self.n_experts, bias=False)
        self.experts = Experts(self.n_experts, config["dim"], config["moe_hidden"])
        self.shared_expert = FeedForward(config["dim"], config["moe_hidden"])

    def forward(self, x):
        """x (B, T, dim) -> (output (B, T, dim), balancing loss (None outside training: generation skips its
        ops), routed slots per expert (n_experts,), which evaluation reports)."""
        B, T, dim = x.shape
        x = x.reshape(-1, dim)                                          # (N, dim) with N = B * T
        logits = self.router(x)                                         # router: (N, n_experts)
        top_logits, top_experts = logits.topk(self.top_k, dim=-1)       # top-k: (N, top_k) each
        gates = torch.sigmoid(top_logits.float()).type_as(x)            # (N, top_k), each in (0, 1)
        counts = count_slots(top_experts, self.n_experts)               # (n_experts,)
        routed = self.routed_experts(x, gates, top_experts, counts)     # experts: (N, dim), top_k summed
        out = self.shared_expert(x) + routed                            # combine
        aux_loss = self.balancing_loss(logits, counts) if self.training else None
        return out.view(B, T, dim), aux_loss, counts

    def experts_loop(self, x, gates, top_experts):
        """The experts step as the idea reads: for each expert, the tokens that chose it, their inputs scaled by
        their gates, through the expert, added to those tokens. x (N, dim) -> (N, dim). The reference: slow (a
        Python loop, and a gather whose size depends on the data, for each expert)."""
        out = torch.zeros_like(x)
        for e in range(self.n_experts):
            token, slot = (top_experts == e).nonzero(as_tuple=True)      # who chose e, as which of its top_k
            out.index_add_(0, token, self.experts.expert(e, x[token] * gates[token, slot, None]))
        return out

    def routed_experts(self, x, gates, top_experts, counts):
        """experts_loop's result, fast: every (token, chosen expert) pair is a row - a slot - and each expert
        runs once on all of its slots. x (N, dim) -> (N, dim)."""
        slot_experts = top_experts.flatten()                            # (N * top_k,) expert of each slot
        # Each token's top_k slots, its input scaled by each slot's gate: (N * top_k, dim); slot s is token
        # s // top_k's.
        slots = (x[:, None, :] * gates[:, :, None]).flatten(0, 1)
        if slot_experts.numel() < self.n_experts:  # a few tokens (decoding): run each slot on its own expert
            out = gathered_experts(self.experts, slots, slot_experts)
        else:
            out = sorted_experts(self.experts, slots, slot_experts, counts)
        return out.view(-1, self.top_k, x.shape[-1]).sum(1)             # each token's top_k slots summed

    def balancing_loss(self, logits, counts):
        """n_experts * sum_i f_i * P_i, from the router's logits (N, n_experts) and the slot counts."""
        slot_share = counts.float() / (logits.shape[0] * self.top_k)    # f_i
        mean_prob = torch.softmax(logits.float(), dim=-1).mean(0)      # P_i
        return self.n_experts * (slot_share * mean_prob).sum()


# The speed devices behind MoE.routed_experts -------------------------------------------------------------

def count_slots(top_experts, n_experts):
    """Routed slots per expert (n_experts,). Not torch.bincount: its output size depends on the data, so on a
    GPU it waits for the device and under torch.compile it splits the graph; scatter_add into n_experts bins
    does not."""
    slot_experts = top_experts.flatten()
    return slot_experts.new_zeros(n_experts).scatter_add_(0, slot_experts, torch.ones_like(slot_experts))


def sorted_experts(experts, slots, slot_experts, counts):
    """Every slot through its own expert: sort the slots by expert so that each expert's slots are one block
    of rows, run every block through its expert with grouped matmuls, and put the rows back in slot order.
    slots (S, dim), slot_experts (S,), counts (n_experts,) -> (S, dim)."""
    order = slot_experts.argsort(stable=True)
    back = torch.empty_like(order).scatter_(0, order, torch.arange(len(order), device=slots.device))  # inverse
    out = grouped_experts(experts, permute_rows(slots, order, back), counts.cumsum(0).to(torch.int32))
    return permute_rows(out, back, order)


class PermuteRows(torch.autograd.Function):
    """rows[order], for a permutation `order` whose inverse is `back`. Autograd would differentiate the gather
    with a scatter-add (index_add), a slow kernel that serialises on a CPU and uses atomics on a GPU; the
    gradient of a permutation is just the inverse permutation, another gather."""

    @staticmethod
    def forward(ctx, rows, order, back):
        ctx.save_for_backward(back)
        return rows.index_select(0, order)

    @staticmethod
    def backward(ctx, grad):
        (back,) = ctx.saved_tensors
        return grad.index_select(0, back), None, None


permute_rows = PermuteRows.apply


def grouped_experts(experts, x, group_ends):
    """x: (slots, dim), sorted by expert; rows group_ends[e-1]:group_ends[e] belong to expert e.
    F.grouped_mm multiplies each group by its own expert's matrix in one call: no Python loop over
    experts and no host sync, so it runs as one kernel on the GPU and, in bf16, stays inside the graph
    that torch.compile builds."""
    # Autocast does not cover grouped_mm, so cast as it would for a matmul (bf16 under bf16 autocast).
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    # torch.compile lowers grouped_mm for bf16 only; in other dtypes the call breaks the graph and runs eagerly.
    grouped = grouped_matmul if dtype == torch.bfloat16 else eager_grouped_matmul
    matmul = lambda a, w: grouped(a.to(dtype), w.to(dtype), group_ends)
    return matmul(F.silu(matmul(x, experts.gate_proj)) * matmul(x, experts.up_proj), experts.down_proj)


def grouped_matmul(x, weights, group_ends):
    """Rows group_ends[e-1]:group_ends[e] of x times weights[e], for every expert e, in one call."""
    return F.grouped_mm(x, weights, offs=group_ends)


eager_grouped_matmul = torch.compiler.disable(grouped_matmul)


def gathered_experts(experts, x, slot_experts):
    """x: (slots, dim), slot_experts: (slots,) the expert of each row. For a handful of rows (decoding one
    token): gather just the chosen experts' weights and run one batched matmul per projection, instead of
    grouped matmuls that visit every expert, most of them with no rows."""
    pick = lambda w: w.index_select(0, slot_experts)                    # (slots, in, out)
    x = x[:, None]                                                      # (slots, 1, dim)
    hidden = F.silu(torch.bmm(x, pick(experts.gate_proj))) * torch.bmm(x, pick(experts.up_proj))
    return torch.bmm(hidden, pick(experts.down_proj))[:, 0]             # (slots, dim)


# Which layers are which (Block): layer i has an MoE when (i + 1) % moe_every == 0, and NoPE attention when
# (i + 1) % nope_every == 0. With moe_every=2 and nope_every=4, the default and the seed's:
#
#   layer           0      1      2      3             the default model: 4 layers
#   attention       RoPE   RoPE   RoPE   NoPE
#   feed-forward    dense  MoE    dense  MoE
#
#   layer           0 1 2 3 4 5 6 7 8 9 10 11          the seed's recipe: 12 layers, the same 4 three times
#   attention       R R R N R R R N R R R  N
#   feed-forward    d M d M d M d M d M d  M
#
# `python pretrain.py` prints the strip of the model it builds.

class Block(nn.Module):
    """One pre-norm decoder layer: h = x + attn(norm(x)); out = h + ffn(norm(h)). The FFN is an MoE on every
    `moe_every`-th layer and a dense SwiGLU elsewhere; attention is NoPE on every `nope_every`-th layer."""

    def __init__(self, config, layer):
        super().__init__()
        self.is_moe = (layer + 1) % config["moe_every"] == 0
        self.use_rope = (layer + 1) % config["nope_every"] != 0
        self.attn_norm = RMSNorm(config["dim"], config["norm_eps"])
        self.attn = Attention(config, self.use_rope, layer)
        self.ffn_norm = RMSNorm(config["dim"], config["norm_eps"])
        self.ffn = MoE(config) if self.is_moe else FeedForward(config["dim"], config["ffn_hidden"])

    def forward(self, x, rope, cache=None, offset=0, queries=None):
        """-> (output, the MoE's balancing loss or None, its routed slots per expert or None). With `queries`
        (B, K) the output is of those positions only (Transformer.forward's at_targets)."""
        residual = x if queries is None else rows_at(x, queries)
        h = residual + self.attn(self.attn_norm(x), rope, cache, offset, queries)
        if self.is_moe:
            ffn_out, aux_loss, counts = self.ffn(self.ffn_norm(h))
            return h + ffn_out, aux_loss, counts
        return h + self.ffn(self.ffn_norm(h)), None, None


def rows_at(x, positions):
    """x[b, positions[b, k]] for every row b: (B, T, dim), (B, K) -> (B, K, dim)."""
    return x.gather(1, positions[..., None].expand(-1, -1, x.shape[-1]))


def target_positions(targets):
    """(B, K) positions: each row's positions that have a target (targets != -100), in order, K the most any row
    has; a row with fewer is filled up with its first positions without one (whose target stays -100)."""
    has_target = targets != -100
    K = max(1, int(has_target.sum(1).max()))
    return torch.argsort((~has_target).to(torch.uint8), dim=1, stable=True)[:, :K]


class Transformer(nn.Module):
    """The whole language model: token embedding, n_layers blocks, final RMSNorm, and an untied LM head."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config["vocab_size"], config["dim"])
        self.layers = nn.ModuleList(Block(config, layer) for layer in range(config["n_layers"]))
        self.norm = RMSNorm(config["dim"], config["norm_eps"])
        self.lm_head = nn.Linear(config["dim"], config["vocab_size"], bias=False)
        cos, sin = rope_angles(head_dim_of(config), config["context"], config["rope_theta"])
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        """Normal(0, 0.02) everywhere; the projections that write into the residual stream are scaled down by
        sqrt(2 * n_layers) so that the stream's variance does not grow with depth (GPT-2's rule)."""
        residual_std = 0.02 / math.sqrt(2 * self.config["n_layers"])
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, Experts):
            nn.init.normal_(module.gate_proj, std=0.02)
            nn.init.normal_(module.up_proj, std=0.02)
            nn.init.normal_(module.down_proj, std=residual_std)
        if isinstance(module, (Attention, FeedForward)):
            out_proj = module.o_proj if isinstance(module, Attention) else module.down_proj
            nn.init.normal_(out_proj.weight, std=residual_std)

    def forward(self, tokens=None, targets=None, embeds=None, cache=None, expert_counts=False, at_targets=False):
        """tokens: (B, T) ids, or embeds: (B, T, dim) ready-made input vectors (phase 2 puts image features
        among them). targets: (B, T) next-token ids, -100 where no loss is taken.
        Returns (logits (B, T, vocab), language-model loss or None, mean MoE load-balancing loss or None); with
        expert_counts=True a fourth item, the routed slots per expert of every MoE layer (n_moe_layers,
        n_experts), or None for a model without MoE layers.

        at_targets=True (phases 2-4, with targets): logits (B, K, vocab) of target_positions(targets) only. Most
        positions there are image or prompt tokens, with no target. Every layer but the last must still run
        at every position, since later positions attend to them; the last block's output at a position is
        used only by that position's logits, so the last block runs only where there is a target (its keys
        and values still from every position). The loss is the same; a phase-3 step takes about a sixth less
        time (docs/research.md). The last MoE layer routes, and balances, those positions only."""
        x = self.embed_tokens(tokens) if embeds is None else embeds    # (B, T, dim)
        offset = cache.length if cache is not None else 0
        if offset + x.shape[1] > self.config["context"]:
            raise ValueError(f"sequence of {offset + x.shape[1]} tokens exceeds the context of "
                             f"{self.config['context']}")
        queries = None
        if at_targets:
            if targets is None or cache is not None:
                raise ValueError("at_targets needs targets, and no KV cache")
            queries = target_positions(targets)                        # (B, K)
            targets = targets.gather(1, queries)                       # (B, K)
        aux_losses, counts = [], []
        for i, layer in enumerate(self.layers):
            last = i == len(self.layers) - 1
            x, aux_loss, layer_counts = layer(x, (self.rope_cos, self.rope_sin), cache, offset,
                                              queries if last else None)
            if aux_loss is not None:
                aux_losses.append(aux_loss)
            if layer_counts is not None:
                counts.append(layer_counts)
        if cache is not None:
            cache.length += x.shape[1]
        logits = self.lm_head(self.norm(x))                           # (B, T or K, vocab)
        loss = aux = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
            aux = torch.stack(aux_losses).mean() if aux_losses else torch.zeros((), device=x.device)
        if expert_counts:
            return logits, loss, aux, (torch.stack(counts) if counts else None)
        return logits, loss, aux


def count_parameters(model):
    """(total, active per token). Active counts the shared expert and top_k of the routed experts."""
    total = sum(p.numel() for p in model.parameters())
    idle = 0
    for module in model.modules():
        if isinstance(module, Experts):
            per_expert = sum(p[0].numel() for p in module.parameters())
            idle += per_expert * (module.gate_proj.shape[0] - model.config["top_k"])
    return total, total - idle


def model_from_checkpoint(path, make_it="python pretrain.py", device="cpu"):
    """(model in eval mode, tokenizer, checkpoint) from a phase-1 checkpoint."""
    state = load_checkpoint(path, make_it)
    if "tokenizer" not in state or "config" not in state:
        raise TrainingError(f"{path} is not a phase-1 checkpoint (no config or tokenizer); recreate it with: {make_it}")
    if "llm_config" in state:
        raise TrainingError(f"{path} is a phase-2/3 (vision-language) checkpoint; this needs a phase-1 one, "
                            f"made by: {make_it}")
    model = Transformer(state["config"])
    load_model_state(model, state["model"], path)
    return model.to(device).eval(), load_tokenizer(state["tokenizer"]), state


# ----------------------------------------------------------------------------------------------------------
# Inference: the KV cache and generation
# ----------------------------------------------------------------------------------------------------------

class KVCache:
    """Keys and values of every layer for the positions processed so far, so that each new token costs one
    position of attention instead of recomputing the whole prefix."""

    def __init__(self, model, batch_size, max_len, dtype=None):
        config, device = model.config, model.lm_head.weight.device
        shape = (batch_size, config["n_kv_heads"], max_len, head_dim_of(config))
        dtype = dtype or model.lm_head.weight.dtype
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in model.layers]   # one per layer
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in model.layers]
        self.length = 0  # positions cached so far; Transformer.forward advances it once all layers have run

    def update(self, layer, k, v, offset):
        """Store layer number `layer`'s k, v (B, n_kv_heads, T, head_dim) at `offset`; return its keys and
        values so far, (B, n_kv_heads, offset + T, head_dim) each."""
        end = offset + k.shape[2]
        self.keys[layer][:, :, offset:end] = k
        self.values[layer][:, :, offset:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def rows(self, index, max_len):
        """A new cache holding rows `index` (a row may repeat) of this one's positions so far, with room for
        max_len positions: a prefix computed once and continued by several prompts (one image, many questions)."""
        grow = lambda t: F.pad(t[index, :, :self.length], (0, 0, 0, max_len - self.length))  # (len(index), ...)
        shared = KVCache.__new__(KVCache)
        shared.keys, shared.values = [grow(k) for k in self.keys], [grow(v) for v in self.values]
        shared.length = self.length
        return shared


def sample_next(logits, temperature=0.0, top_k=0, top_p=1.0, generator=None):
    """Pick the next token from logits (B, vocab): greedy when temperature is 0, else sample after
    temperature scaling, top-k and top-p (nucleus) filtering. Top-k keeps every logit at least as large as the
    k-th largest, so tokens tied with the k-th all stay (as transformers' top-k does)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p       # keep the smallest set reaching top_p
        logits = logits.scatter(-1, sorted_ids, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, tokens, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, embeds=None,
             stop_ids=(EOS_ID, EOT_ID), generator=None, cache=None):
    """Continue the prompt `tokens` (B, T) - or the ready-made input vectors `embeds` (B, T, dim) - with the KV
    cache. Returns the new ids (B, <= max_new_tokens); generation stops when every row has hit a stop id.
    `cache`: a KVCache that already holds the prompt's beginning, with room for the rest and the new tokens."""
    prompt_len = (tokens if embeds is None else embeds).shape[1] + (cache.length if cache is not None else 0)
    batch = (tokens if embeds is None else embeds).shape[0]
    max_new_tokens = min(max_new_tokens, model.config["context"] - prompt_len)
    if cache is None:
        cache = KVCache(model, batch, prompt_len + max_new_tokens)
    logits, _, _ = model(tokens if embeds is None else None, embeds=embeds, cache=cache)
    stop = torch.tensor(stop_ids, device=logits.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=logits.device)
    new_tokens = []
    for _ in range(max_new_tokens):
        next_token = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
        next_token = next_token.masked_fill(finished, EOS_ID)          # finished rows just repeat the end token
        new_tokens.append(next_token)
        finished |= torch.isin(next_token, stop)
        if finished.all() or len(new_tokens) == max_new_tokens:
            break
        logits, _, _ = model(next_token[:, None], cache=cache)
    return torch.stack(new_tokens, dim=1) if new_tokens else torch.zeros(batch, 0, dtype=torch.long)


# ----------------------------------------------------------------------------------------------------------
# The training loop: written once here, called by align.py and instruct.py with their own model and batches
# ----------------------------------------------------------------------------------------------------------

def setup_device(config):
    """(rank, world_size, device). Under torchrun (WORLD_SIZE > 1) joins the process group: NCCL on CUDA,
    gloo on the CPU. Each rank gets its own GPU."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    name = config["device"]
    if name == "auto":
        name = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device={name} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device={name}, but torch sees no CUDA GPU; use --device=cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def once_per_node(prepare):
    """prepare() on each machine's first process (torchrun's LOCAL_RANK 0) while every other process waits,
    then prepare() on the others, which find the work done and only read it. Per machine, not per job: data
    and caches are written to a machine's own disk, so under a multi-node torchrun without a shared
    filesystem each node prepares its own copy. (Without torchrun: prepare() once.)"""
    first = int(os.environ.get("LOCAL_RANK", 0)) == 0
    result = prepare() if first else None
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return result if first else prepare()


def autocast_dtype(config, device):
    """The mixed-precision dtype, or None for plain fp32."""
    name = config["dtype"]
    if name == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def make_optimizer(model, config, device, lr_scale=None):
    """AdamW over the trainable parameters. Weight decay only on matrices (weights, embeddings, experts),
    never on norms. `lr_scale(name)` gives a parameter group its own multiple of the learning rate."""
    groups = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            decay = config["weight_decay"] if param.dim() >= 2 else 0.0
            scale = lr_scale(name) if lr_scale else 1.0
            groups.setdefault((decay, scale), []).append(param)
    param_groups = [dict(params=p, weight_decay=d, lr_scale=s) for (d, s), p in groups.items()]
    # fused: one kernel updates every parameter (CUDA and CPU), instead of a Python loop over parameters.
    return torch.optim.AdamW(param_groups, lr=config["lr"], betas=(config["beta1"], config["beta2"]),
                             fused=device.type in ("cuda", "cpu"))


def lr_at(step, config):
    """Linear warmup to lr, then cosine decay to min_lr at max_iters."""
    if step < config["warmup_iters"]:
        return config["lr"] * (step + 1) / config["warmup_iters"]
    progress = min(1.0, (step - config["warmup_iters"]) / max(1, config["max_iters"] - config["warmup_iters"]))
    return config["min_lr"] + 0.5 * (1 + math.cos(math.pi * progress)) * (config["lr"] - config["min_lr"])


def save_checkpoint(path, state):
    """Write to a temporary file, then atomically replace: a crash mid-save never spoils the last checkpoint."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path, make_it="python pretrain.py"):
    """Read a checkpoint without unpickling arbitrary objects (weights_only=True)."""
    if not os.path.isfile(path):
        raise TrainingError(f"no checkpoint at {path}; create one with: {make_it}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: say which, whatever torch's unpickler raised
        raise TrainingError(f"{path} is not a readable checkpoint ({type(error).__name__}); "
                            f"recreate it with: {make_it}") from None


def load_model_state(model, state_dict, path):
    """load_state_dict that turns a shape or key mismatch into one clear line."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        detail = next((line.strip() for line in first[1:] if line.strip()), first[0])
        raise TrainingError(f"{path} was made with a different model config ({detail[:200]})") from None


@torch.no_grad()
def evaluate(model, batches, autocast):
    """Mean validation loss over the fixed eval batches, and each MoE layer's share of routed slots per expert
    (n_moe_layers, n_experts), or None for a model without experts."""
    model.eval()
    has_experts = any(isinstance(module, MoE) for module in model.modules())
    losses, counts = [], 0
    for batch in batches.eval_batches():
        with autocast:
            if has_experts:  # the model returns its layers' slot counts as a fourth item
                _, loss, _, batch_counts = model(**batch, expert_counts=True)
                counts = counts + batch_counts.float()
            else:
                _, loss, _ = model(**batch)
        losses.append(loss.float())
    model.train()
    shares = counts / counts.sum(-1, keepdim=True) if has_experts else None
    return torch.stack(losses).mean().item(), shares


def peak_flops(device):
    """Dense bf16 peak of known GPUs (FLOP/s), for MFU; None where unknown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in (("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("L40", 181e12),
                       ("4090", 165e12), ("3090", 71e12)):
        if key in name:
            return flops
    return None


def flops_per_token(config):
    """Training FLOPs per token: 6 per active matmul parameter (forward 2, backward 4) plus attention, which
    is 12 * heads * head_dim per attended key (QK^T and AV, forward and backward); a causal query attends to
    (keys + 1) / 2 keys on average, within its chunk on RoPE layers and over the context on NoPE layers."""
    with torch.device("meta"):  # count without allocating the weights
        total, active = count_parameters(Transformer(config))
    matmul_params = active - config["vocab_size"] * config["dim"]  # the embedding is a lookup, not a matmul
    attention = 0.0
    for layer in range(config["n_layers"]):
        span = config["context"] if (layer + 1) % config["nope_every"] == 0 else min(config["attn_chunk"],
                                                                                    config["context"])
        attention += 12 * config["n_heads"] * head_dim_of(config) * (span + 1) / 2
    return 6 * matmul_params + attention


def log(config, line):
    """Print one line of the training log and append it to <out_dir>/log.txt, which a run keeps beside its
    checkpoint (python docs/figures.py loss <out_dir>/log.txt plot.svg draws the loss curves from it)."""
    print(line, flush=True)
    os.makedirs(config["out_dir"], exist_ok=True)
    with open(os.path.join(config["out_dir"], "log.txt"), "a") as f:
        f.write(line + "\n")


class TrainingRun(NamedTuple):
    """What resume and evaluate_and_save need of a run besides its step; train builds it once."""
    config: dict
    model: nn.Module            # the model itself (not its torch.compile or DDP wrapper): saved and evaluated
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    batches: object
    autocast: object
    rank: int
    world: int
    evaluate_extra: object      # model -> {metric: value}, or None
    checkpoint_extra: dict      # more entries for every checkpoint, or None
    path: str                   # <out_dir>/ckpt.pt


def train(config, model, batches, evaluate_extra=None, lr_scale=None, checkpoint_extra=None, flops_per_token=0):
    """The hand-written training loop shared by every phase: nanoGPT's, stage by stage.

    model(**batch) must return (logits, loss, aux_loss or None); batches gives .next("train"), .eval_batches(),
    .state_dict() and .load_state_dict(). evaluate_extra(model) may add metrics (e.g. caption accuracy) to
    each evaluation; checkpoint_extra adds entries to every checkpoint. flops_per_token is the model's
    training FLOPs per token (per sample when the batches hold no "tokens"): on a GPU whose peak peak_flops
    knows, the log shows MFU; 0 leaves it out. Returns the list of (step, training loss) pairs, for tests.
    """
    rank, world, device = setup_device(config)
    raw_model = model.to(device)
    amp_dtype = autocast_dtype(config, device)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)  # a no-op but in fp16
    optimizer = make_optimizer(raw_model, config, device, lr_scale)
    ckpt_path = os.path.join(config["out_dir"], "ckpt.pt")
    training = TrainingRun(config, raw_model, optimizer, scaler, batches, autocast, rank, world, evaluate_extra,
                           checkpoint_extra, ckpt_path)
    step, best_val = resume(training) if config["resume"] else (0, float("inf"))
    log_path = os.path.join(config["out_dir"], "log.txt")
    if rank == 0 and not config["resume"] and os.path.exists(log_path):
        os.remove(log_path)  # a new run starts a new log; a resumed one goes on with its own
    if config["compile"]:
        model = torch.compile(model)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    peak = peak_flops(device) if flops_per_token else None  # MFU's denominator
    accum, start_step, history = config["grad_accum_steps"], step, []
    raw_model.train()
    t0, started, processed = time.time(), time.time(), 0
    while step < config["max_iters"]:
        # --- evaluate and save, every eval_interval steps (a resumed run does not redo its first) ---
        if step % config["eval_interval"] == 0 and step > start_step:
            best_val = evaluate_and_save(training, step, best_val)
            t0, processed = time.time(), 0  # keep evaluation time out of the tokens/s figure
        # --- learning rate of this step ---
        lr = lr_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        # --- data: the step's micro-batches, and the share of the step's loss that each one carries ---
        micro_batches = [batches.next("train") for _ in range(accum)]
        shares = loss_shares(batches, micro_batches, world)
        losses, aux_losses = [], []  # each micro-batch's, for the log
        for micro_step, (batch, share) in enumerate(zip(micro_batches, shares)):
            processed += batch["tokens"].numel() if "tokens" in batch else len(next(iter(batch.values())))
            # DDP all-reduces gradients on every backward; skip it on all but the last micro-step.
            sync = model.no_sync() if world > 1 and micro_step < accum - 1 else contextlib.nullcontext()
            with sync:
                # --- forward ---
                with autocast:
                    _, loss, aux_loss = model(**batch)
                    total = loss if aux_loss is None else loss + config["aux_loss_coef"] * aux_loss
                    total = total * share
                # --- backward: gradients add up over the micro-steps ---
                scaler.scale(total).backward()
            losses.append(loss.detach() * share)
            if aux_loss is not None:
                aux_losses.append(aux_loss.detach())
        loss_value = mean_over_ranks([sum(losses)], world)  # the step's training loss, over every rank
        if not math.isfinite(loss_value):
            raise TrainingError(f"loss is {loss_value} at step {step}; stopped, and the last good checkpoint "
                                f"({ckpt_path}) is kept. Try a lower --lr or --dtype=float32.")
        # --- clip ---
        if config["grad_clip"] > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), config["grad_clip"])
        # --- step ---
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        history.append((step, loss_value))
        step += 1
        # --- log ---
        if rank == 0 and (step % config["log_interval"] == 0 or step == 1):
            speed, t0, processed = processed * world / (time.time() - t0), time.time(), 0  # all ranks' together
            aux = f" | aux {torch.stack(aux_losses).mean().item():.3f}" if aux_losses else ""
            unit = "tok/s" if "tokens" in batch else "samples/s"
            line = f"step {step:>6} | loss {loss_value:.4f}{aux} | lr {lr:.2e} | {speed:,.0f} {unit}"
            if peak:  # only for GPUs whose peak FLOP/s peak_flops knows
                line += f" | MFU {100 * speed * flops_per_token / (world * peak):.1f}%"
            if device.type == "cuda":
                line += f" | mem {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
            log(config, line)
        if out_of_time(config, started, device, world):
            if rank == 0:
                log(config, f"stopping at step {step}: max_seconds={config['max_seconds']} reached")
            break
    # --- the last evaluation and checkpoint ---
    if step > start_step or not os.path.exists(ckpt_path):
        evaluate_and_save(training, step, best_val)
    if world > 1:
        torch.distributed.barrier()
    return history


def check_phase(state, phase, path):
    """A run resumes only a checkpoint its own phase wrote: pretrain.py over out/align, say, would otherwise
    fail later with a misleading message (another model config, another optimizer). Checkpoints that
    record no phase (older ones, tests' own runs) are not checked."""
    saved = state.get("phase")
    if saved and phase and saved != phase:
        raise TrainingError(f"{path} was written by {saved}.py, not {phase}.py; resume it with {saved}.py, or "
                            f"pass this run another --out_dir")


def resume(training):
    """Load training.path into the model, the optimizer, the fp16 loss scaler, the batches (each rank its own
    data order) and torch's random state; returns the (step, best val loss) to continue from."""
    path, optimizer, rank, world = training.path, training.optimizer, training.rank, training.world
    state = load_checkpoint(path, make_it="the same command without --resume=True")
    check_phase(state, training.config.get("phase"), path)
    load_model_state(training.model, state["model"], path)
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict(state["optimizer"])
    except ValueError as error:  # another number or size of parameter groups
        raise TrainingError(f"{path}'s optimizer state does not fit this run ({error}); resume with the "
                            f"settings it was trained with (e.g. --weight_decay, --projector_lr_scale)") from None
    for group, setting in zip(optimizer.param_groups, settings):
        group.update(setting)  # this run's weight decay, betas and lr scale, not the saved ones
    data_states = state["batches"]  # a list with one state per rank: each rank draws its own data
    data_states = data_states if isinstance(data_states, list) else [data_states]  # older checkpoints
    if len(data_states) == world:
        training.batches.load_state_dict(data_states[rank])
    elif rank == 0:
        print(f"note: {path} was saved by {len(data_states)} process(es), this run has {world}: every rank "
              f"restarts its data order from its seed", flush=True)
    torch.set_rng_state(state["rng"])
    if state.get("scaler"):  # fp16's loss scale, as it had adapted
        training.scaler.load_state_dict(state["scaler"])
    if rank == 0:
        print(f"resumed from {path} at step {state['step']}", flush=True)
    return state["step"], state["best_val_loss"]


def evaluate_and_save(training, step, best_val):
    """Evaluate (val loss, expert shares, evaluate_extra's metrics), log it and write the checkpoint on rank 0;
    returns the best val loss so far. A non-finite val loss stops the run and keeps the last checkpoint."""
    model, batches, path = training.model, training.batches, training.path
    val_loss, shares = evaluate(model, batches, training.autocast)
    if not math.isfinite(val_loss):
        raise TrainingError(f"validation loss is {val_loss} at step {step}; the last good checkpoint ({path}) "
                            f"is kept. Try a lower --lr.")
    best_val = min(best_val, val_loss)
    extra = training.evaluate_extra(model) if training.evaluate_extra else {}
    # Rank 0 writes the checkpoint, but every rank's data order must be in it for a resume to continue.
    data_states = [batches.state_dict()]
    if training.world > 1:
        data_states = [None] * training.world
        torch.distributed.all_gather_object(data_states, batches.state_dict())
    if training.rank == 0:
        usage = f" | experts min/max share {shares.min():.3f}/{shares.max():.3f}" if shares is not None else ""
        metrics = "".join(f" | {k} {v:.3f}" for k, v in extra.items())
        log(training.config, f"eval step {step}: val loss {val_loss:.4f} | perplexity "
                             f"{math.exp(min(val_loss, 50)):.2f}{usage}{metrics}")
        config = training.config
        save_checkpoint(path, dict(  # the phase that wrote it first; phases 2 and 3 add llm_config, tokenizer
            phase=config.get("phase"), model=model.state_dict(), optimizer=training.optimizer.state_dict(),
            config=config, step=step, best_val_loss=best_val, val_loss=val_loss, rng=torch.get_rng_state(),
            scaler=training.scaler.state_dict(), batches=data_states, **(training.checkpoint_extra or {})))
    return best_val


def loss_shares(batches, micro_batches, world):
    """The weight of each micro-batch's loss in the step's. A loss is the mean over its micro-batch's counted
    items (the targets that are not -100, or DPO's pairs), and DDP averages the ranks' gradients. Text windows
    all count as many targets, so each micro-batch weighs 1 / grad_accum_steps. Captions and conversations do
    not: there each micro-batch weighs its share of the step's counted targets, over every rank, so that the
    step's loss is the mean over all of them, as one big batch's would be (a micro-batch mean would give a
    target of a short micro-batch more weight). batches.loss_counts(micro_batch), where defined, counts; the
    shares stay on the device as tensors, so that no step waits for the GPU to report a count."""
    count = getattr(batches, "loss_counts", None)
    if count is None:
        return [1 / len(micro_batches)] * len(micro_batches)
    counts = torch.stack([count(batch) for batch in micro_batches]).float()
    total = counts.sum()
    if world > 1:
        torch.distributed.all_reduce(total)
    return list(counts * world / total)


def mean_over_ranks(losses, world):
    """The mean of the given losses (a rank's step loss, or several), averaged over every rank, as a float.
    Every rank gets the same value, so a NaN on one rank stops every rank."""
    mean = torch.stack(losses).float().mean()
    if world > 1:
        torch.distributed.all_reduce(mean)
        mean /= world
    return mean.item()


def out_of_time(config, started, device, world):
    """Has training run max_seconds (if set) since `started`? Under DDP any rank's clock stops every rank:
    they must stop at the same step, or the others wait forever in an all-reduce."""
    if not config["max_seconds"]:
        return False
    out = time.time() - started > config["max_seconds"]
    if world > 1:
        flag = torch.tensor(float(out), device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        out = bool(flag.item())
    return out


# ----------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------

@torch.no_grad()
def copy_losses(model, tokenizer, n_scenes=60):
    """Does the model read its context? On "this picture shows CAPTION\nagain: CAPTION" about held-out Shapes
    World scenes, the mean loss (nats) on the restated colour, kind and size words. Without copying, the best
    is a blind guess: ln 6 = 1.79 for colour, ln 4 = 1.39 for kind, ln 2 = 0.69 for size. Phase 2's frozen LLM
    must read image tokens the same way, so this predicts how well it can caption."""
    from data import shapes_world
    words = {"copy color": shapes_world.COLORS, "copy kind": shapes_world.KINDS, "copy size": shapes_world.SIZES}
    losses = {name: [] for name in words}
    was_training = model.training
    model.eval()
    device = model.lm_head.weight.device
    for scene in shapes_world.make_scenes("val", n_scenes, seed=1):
        said = shapes_world.caption(scene)
        tokens = [BOS_ID] + encode(tokenizer, f"this picture shows {said}\nagain: {said}")
        start = len(tokens) - len(encode(tokenizer, said))  # where the restatement begins
        if len(tokens) > model.config["context"]:
            continue  # a model with a short context cannot take this test
        logits, _, _ = model(torch.tensor([tokens], device=device))
        log_probs = logits[0].float().log_softmax(-1)
        for t in range(start, len(tokens)):
            word = tokenizer.decode([tokens[t]]).strip()
            for name, values in words.items():
                if word in values:
                    losses[name].append(-log_probs[t - 1, tokens[t]].item())
    model.train(was_training)
    return {name: sum(v) / len(v) for name, v in losses.items() if v}


@torch.no_grad()
def bits_per_byte(model, tokenizer, data_dir, n_documents=200):
    """Cross-entropy in bits per UTF-8 byte over the first n whole validation documents: every token after
    <|begin_of_text|> (the text and its <|end_of_text|>) is predicted, and the bits are divided by the bytes of
    the text. Unlike the loss per token this does not depend on the tokenizer, so runs with different
    vocabularies compare."""
    stream = np.memmap(os.path.join(data_dir, "val.bin"), dtype=np.uint16, mode="r")
    ends = np.flatnonzero(stream == EOS_ID)[:n_documents]
    starts = np.concatenate([[0], ends[:-1] + 1])
    documents = [stream[s:e + 1].astype(np.int64).tolist() for s, e in zip(starts, ends)]
    documents = [d[:model.config["context"] + 1] for d in documents]  # a longer document is scored in part
    was_training = model.training
    model.eval()
    device, bits, n_bytes = model.lm_head.weight.device, 0.0, 0
    for start in range(0, len(documents), 32):
        group = documents[start:start + 32]
        length = max(len(d) for d in group) - 1
        tokens = torch.full((len(group), length), EOS_ID)
        targets = torch.full((len(group), length), -100)
        for i, d in enumerate(group):
            tokens[i, :len(d) - 1], targets[i, :len(d) - 1] = torch.tensor(d[:-1]), torch.tensor(d[1:])
        _, loss, _ = model(tokens.to(device), targets.to(device))
        bits += loss.item() * (targets != -100).sum().item() / math.log(2)
        n_bytes += sum(len(tokenizer.decode(d[1:-1]).encode()) for d in group)
    model.train(was_training)
    return bits / n_bytes


@torch.no_grad()
def binding_probe(model, tokenizer, n_scenes=100):
    """Can the model answer from its context? After the caption of a held-out scene, each of the scene's
    questions in the corpus's own form ("q: ... a:"), answered greedily; accuracy per question type. Existence
    and position questions need a colour and a kind bound together ("is there a red circle?"), the skill the
    phase-3 model needs to answer them about image tokens."""
    from data import shapes_world
    rng = random.Random(0)
    by_length = {}  # prompts of one length form one batch, so that no row needs padding
    for scene in shapes_world.make_scenes("val", n_scenes, seed=1):
        for question, answer, kind in shapes_world.questions(scene, rng):
            prompt = [BOS_ID] + encode(tokenizer, f"{shapes_world.caption(scene)}\nq: {question} a:")
            if len(prompt) + 6 <= model.config["context"]:  # a model with a short context skips what does not fit
                by_length.setdefault(len(prompt), []).append((prompt, answer, kind))
    was_training = model.training
    model.eval()
    right, total = {}, {}
    for group in by_length.values():
        prompts = torch.tensor([prompt for prompt, _, _ in group], device=model.lm_head.weight.device)
        for (_, answer, kind), ids in zip(group, generate(model, prompts, 6).tolist()):
            reply = tokenizer.decode(ids).split("\n")[0]  # the answer ends its line
            for key in (kind, "all"):
                right[key] = right.get(key, 0) + shapes_world.score_answer(reply, answer)
                total[key] = total.get(key, 0) + 1
    model.train(was_training)
    return {f"probe {k}": right[k] / total[k] for k in ["all"] + sorted(k for k in total if k != "all")}


def describe_model(model):
    total, active = count_parameters(model)
    c = model.config
    kinds = ", ".join(f"{i}:{'MoE' if b.is_moe else 'dense'}/{'RoPE' if b.use_rope else 'NoPE'}"
                      for i, b in enumerate(model.layers))
    return (f"model: {total:,} parameters, {active:,} active per token | dim {c['dim']}, {c['n_layers']} layers "
            f"({kinds}), {c['n_heads']} query / {c['n_kv_heads']} KV heads, {c['n_experts']} experts top-{c['top_k']}")


def main(argv=None):
    config = get_config("pretrain", argv)
    rank, world, device = setup_device(config)
    torch.manual_seed(config["seed"])
    meta = once_per_node(lambda: ensure_text_data(config))
    tokenizer = load_tokenizer(config["data_dir"])
    model = Transformer(config)
    if rank == 0:
        print(describe_model(model), flush=True)
        print(f"training on {device} x {world}: {config['max_iters']} steps of "
              f"{config['batch_size'] * config['grad_accum_steps'] * world} x {config['context']} tokens; "
              f"baseline: token frequencies alone give val loss {meta.get('unigram_val_loss', float('nan')):.3f}",
              flush=True)
    batches = TextBatches(config["data_dir"], config["context"], config["batch_size"], device, config["seed"],
                          rank, config["eval_iters"],
                          piece=(config["attn_chunk"] or config["context"]) if config["doc_aligned"] else 0)
    def extra_metrics(model):
        metrics = {"val bpb": bits_per_byte(model, tokenizer, config["data_dir"])}
        if config["text_source"] == "shapes":  # how well it reads its context: the skill phases 2 and 3 need
            metrics.update(copy_losses(model, tokenizer))
            metrics.update(binding_probe(model, tokenizer))
        return metrics
    train(config, model, batches, evaluate_extra=extra_metrics, checkpoint_extra=dict(tokenizer=tokenizer.to_str()),
          flops_per_token=flops_per_token(config))
    if rank == 0:
        print(f"saved {os.path.join(config['out_dir'], 'ckpt.pt')}; try: python sample.py --prompt \"a red\"")


if __name__ == "__main__":
    run(main)
