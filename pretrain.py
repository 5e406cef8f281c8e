"""Phase 1: pretrain a Llama-4-style decoder language model on text.

    python pretrain.py                          # Shapes World on the CPU, a few minutes
    python pretrain.py --preset=llama4_seed     # the seed's recipe: cosmopedia-v2, 20k steps, bf16 on CUDA
    torchrun --standalone --nproc_per_node=2 pretrain.py   # the same with DistributedDataParallel

Read top to bottom, this file is the course: the tokenizer and the data loader, then the model one box of the
architecture diagram at a time (RMSNorm, RoPE, attention with GQA and chunking, SwiGLU, mixture of experts,
the block, the whole model, the KV cache and generation), then the training loop that phases 2 and 3 reuse,
then main.
"""
import contextlib
import functools
import math
import os
import time

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
    made = {key: recorded.get(key, value) for key, value in wanted.items()}
    if made != wanted:
        differ = ", ".join(f"{key}={made[key]} (now {wanted[key]})" for key in wanted if made[key] != wanted[key])
        raise DataError(f"{config['data_dir']} was prepared with {differ}; pass another --data_dir, or delete "
                        f"the folder to prepare it again")
    return meta


class TextBatches:
    """Random windows of context + 1 tokens from the memory-mapped token streams, as nanoGPT draws them.

    Each process (DDP rank) has its own seeded generator, so ranks read different windows; the generator's
    state is saved in the checkpoint, so a resumed run draws exactly the windows the uninterrupted run would.
    """

    def __init__(self, data_dir, context, batch_size, device, seed=0, rank=0, eval_iters=20):
        self.data_dir, self.context, self.batch_size, self.device = data_dir, context, batch_size, device
        self.eval_iters, self.seed, self.rank = eval_iters, seed, rank
        self.generator = torch.Generator().manual_seed(seed + rank)
        for split in ("train", "val"):
            if len(self._tokens(split)) <= context + 1:
                raise DataError(f"{data_dir}/{split}.bin holds fewer than context + 1 = {context + 1} tokens; "
                                f"prepare more text or lower --context")

    def _tokens(self, split):
        # A fresh memmap per batch keeps memory flat over long runs (nanoGPT does the same).
        return np.memmap(os.path.join(self.data_dir, f"{split}.bin"), dtype=np.uint16, mode="r")

    def next(self, split="train", generator=None):
        tokens = self._tokens(split)
        starts = torch.randint(len(tokens) - self.context - 1, (self.batch_size,),
                               generator=generator or self.generator).tolist()
        windows = torch.from_numpy(np.stack([tokens[s:s + self.context + 1] for s in starts]).astype(np.int64))
        if self.device.type == "cuda":
            windows = windows.pin_memory().to(self.device, non_blocking=True)
        return dict(tokens=windows[:, :-1], targets=windows[:, 1:])  # (B, T) each; targets shifted by one

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
    of queries and keys on RoPE layers."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


def rope_angles(head_dim, max_len, theta):
    """The rotation of each position, laid out to match the interleaved pairs (dims 2i, 2i+1) of a head:
    pair i turns by pos * theta^(-2i / head_dim), fast for the first pairs and slow for the last.
    Returns cos (max_len, head_dim) = [c0, c0, c1, c1, ...] and sin = [-s0, s0, -s1, s1, ...]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (max_len, head_dim / 2)
    cos, sin = torch.cos(angles), torch.sin(angles)
    return cos.repeat_interleave(2, dim=-1), torch.stack((-sin, sin), dim=-1).flatten(-2)


def apply_rope(x, cos, sin):
    """Rotary position embedding on *interleaved* pairs (x0, x1) = dims (2i, 2i+1), as Meta's Llama code does
    it with complex numbers: (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin). Rotating q and k by their
    positions makes q·k depend only on the distance between them. Written as x * cos + swap(x) * sin, where
    swap exchanges the two dims of every pair: four whole-tensor ops, in fp32.
    x: (B, T, heads, head_dim); cos, sin: (T, head_dim) from rope_angles."""
    x32 = x.float()
    swapped = x32.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)      # (x1, x0) in every pair
    return (x32 * cos[:, None, :] + swapped * sin[:, None, :]).type_as(x)  # cos, sin broadcast over heads


def head_dim_of(config):
    """Width of one attention head: config["head_dim"], or dim // n_heads when that is 0."""
    return config.get("head_dim") or config["dim"] // config["n_heads"]


@functools.lru_cache(maxsize=64)
def attention_mask(length, offset, chunk, device):
    """Boolean (length, offset + length) mask, True where a query may look: keys at or before the query and,
    when `chunk` is set, in the same chunk of `chunk` positions. Built once per shape and cached."""
    query_pos = torch.arange(offset, offset + length, device=device)[:, None]
    key_pos = torch.arange(offset + length, device=device)[None, :]
    mask = key_pos <= query_pos
    if chunk:
        mask &= (key_pos // chunk) == (query_pos // chunk)
    return mask


class Attention(nn.Module):
    """Grouped-query self-attention, in one of Llama 4's two kinds of layer (iRoPE).

    GQA: 12 query heads share 4 key/value heads (groups of 3), which shrinks the KV cache 3x at almost no loss.
    RoPE layers (3 of every 4): rotate q and k by position, normalise them (the weightless "L2 norm"), and
    attend only within the query's chunk of `attn_chunk` positions - local, cheap, and position-aware.
    NoPE layers (every 4th): no rotation, no q/k norm, attend over the whole causal context - global mixing
    that never sees positions it was not trained on, which is what lets Llama 4 stretch to long contexts.
    There the query is scaled by a temperature that grows with log(position) to keep attention sharp over
    very long contexts; it is exactly 1 below position floor_scale - 1 (8191), so it matters only there.
    """

    def __init__(self, config, use_rope):
        super().__init__()
        self.n_heads, self.n_kv_heads = config["n_heads"], config["n_kv_heads"]
        self.head_dim = head_dim_of(config)
        self.use_rope, self.chunk, self.eps = use_rope, config["attn_chunk"], config["norm_eps"]
        self.attn_scale, self.floor_scale = config["attn_scale"], config["floor_scale"]
        dim, kv_dim = config["dim"], self.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(dim, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dim, bias=False)

    def forward(self, x, rope, cache=None, offset=0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)     # (B, T, n_heads, head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, n_kv_heads, head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.use_rope:
            cos, sin = rope[0][offset:offset + T], rope[1][offset:offset + T]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            q, k = rms_normalize(q, self.eps), rms_normalize(k, self.eps)
        elif offset + T >= self.floor_scale:  # below that every position's temperature is exactly 1
            positions = torch.arange(offset, offset + T, device=x.device, dtype=torch.float32)
            temperature = 1 + self.attn_scale * torch.log(torch.floor((positions + 1) / self.floor_scale) + 1)
            q = (q * temperature[:, None, None]).type_as(q)
        chunk = self.chunk if self.use_rope else None
        if cache is None and offset == 0 and chunk and T > chunk and T % chunk == 0:
            # Training on whole chunks: each chunk is an independent causal sequence, so fold the chunks into
            # the batch and use plain causal attention (the fast kernels need no mask). A free reshape.
            fold = lambda t: t.reshape(B * T // chunk, chunk, *t.shape[2:]).transpose(1, 2)
            out = F.scaled_dot_product_attention(fold(q), fold(k), fold(v), is_causal=True, enable_gqa=True)
            out = out.transpose(1, 2).reshape(B, T, -1)
        else:
            k, v = k.transpose(1, 2), v.transpose(1, 2)                 # (B, n_kv_heads, T, head_dim)
            if cache is not None:
                k, v = cache.update(self, k, v, offset)                 # (B, n_kv_heads, offset + T, head_dim)
            if offset == 0 and (chunk is None or T <= chunk):
                mask, causal = None, True                               # one chunk: ordinary causal attention
            elif T == 1:  # decoding one token: it sees every cached key of its own chunk, so no mask is needed
                start = offset // chunk * chunk if chunk else 0
                k, v, mask, causal = k[:, :, start:], v[:, :, start:], None, False
            else:
                mask, causal = attention_mask(T, offset, chunk, x.device), False
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, is_causal=causal,
                                                 enable_gqa=True)       # (B, n_heads, T, head_dim)
            out = out.transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(out)


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
    down_proj (n_experts, hidden, dim). Each expert runs once on the group of tokens routed to it."""

    def __init__(self, n_experts, dim, hidden):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.up_proj = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden, dim))

    def forward(self, x, group_ends):
        """x: (routed tokens, dim), sorted by expert; rows group_ends[e-1]:group_ends[e] belong to expert e.
        F.grouped_mm multiplies each group by its own expert's matrix in one call: no Python loop over
        experts and no host sync, so it runs as one kernel on the GPU and, in bf16, stays inside the graph
        that torch.compile builds."""
        # Autocast does not cover grouped_mm, so cast as it would for a matmul (bf16 under bf16 autocast).
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        # torch.compile lowers grouped_mm for bf16 only; in other dtypes the call breaks the graph and runs eagerly.
        grouped = grouped_matmul if dtype == torch.bfloat16 else eager_grouped_matmul
        matmul = lambda a, w: grouped(a.to(dtype), w.to(dtype), group_ends)
        return matmul(F.silu(matmul(x, self.gate_proj)) * matmul(x, self.up_proj), self.down_proj)

    def for_slots(self, x, experts):
        """x: (slots, dim), experts: (slots,) the expert of each row. For a handful of rows (decoding one
        token): gather just the chosen experts' weights and run one batched matmul per projection, instead of
        a grouped matmul that visits every expert, most of them with no rows."""
        pick = lambda w: w.index_select(0, experts)                     # (slots, in, out)
        x = x[:, None]                                                  # (slots, 1, dim)
        hidden = F.silu(torch.bmm(x, pick(self.gate_proj))) * torch.bmm(x, pick(self.up_proj))
        return torch.bmm(hidden, pick(self.down_proj))[:, 0]            # (slots, dim)


def grouped_matmul(x, weights, group_ends):
    """Rows group_ends[e-1]:group_ends[e] of x times weights[e], for every expert e, in one call."""
    return F.grouped_mm(x, weights, offs=group_ends)


eager_grouped_matmul = torch.compiler.disable(grouped_matmul)


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


class MoE(nn.Module):
    """Mixture of experts: a router picks top_k of n_experts SwiGLU networks for each token, and a shared
    expert sees every token. Parameters grow with n_experts, compute only with top_k: that is the point.

    Llama 4's routing: gate = sigmoid(router logit) of each chosen expert (no renormalisation over the top-k),
    and the gate scales the expert's *input*. Only the routed (token, expert) pairs are computed: tokens are
    sorted by expert, each expert runs once on its group, and the results are added back to their tokens.
    The Switch load-balancing loss n_experts * sum_i f_i * P_i (f_i: share of routed slots sent to expert i,
    P_i: mean router probability of i) is 1 when the load is even and grows as the router collapses.
    """

    def __init__(self, config):
        super().__init__()
        self.n_experts, self.top_k = config["n_experts"], config["top_k"]
        if config["dim"] % 8 or config["moe_hidden"] % 8:
            raise ConfigError("dim and moe_hidden must be multiples of 8 (grouped matmuls need 16-byte strides)")
        self.router = nn.Linear(config["dim"], self.n_experts, bias=False)
        self.experts = Experts(self.n_experts, config["dim"], config["moe_hidden"])
        self.shared_expert = FeedForward(config["dim"], config["moe_hidden"])
        self.tokens_per_expert = None  # the last forward's routed-slot counts, read by evaluation

    def forward(self, x):
        B, T, dim = x.shape
        x = x.reshape(-1, dim)                                          # (N, dim) with N = B * T
        logits = self.router(x)                                         # (N, n_experts)
        top_logits, top_experts = logits.topk(self.top_k, dim=-1)       # (N, top_k) each
        gates = torch.sigmoid(top_logits.float()).type_as(x)
        slot_experts = top_experts.flatten()                            # (N * top_k,) expert of each slot
        # Routed slots per expert. Not torch.bincount: its output size depends on the data, so on a GPU it
        # waits for the device and under torch.compile it splits the graph; scatter_add into n_experts bins
        # does not.
        ones = torch.ones_like(slot_experts)
        counts = slot_experts.new_zeros(self.n_experts).scatter_add_(0, slot_experts, ones)
        self.tokens_per_expert = counts.detach()
        # Each token's top_k slots, its input scaled by each slot's gate: (N * top_k, dim); slot s is token
        # s // top_k's.
        slots = (x[:, None, :] * gates[:, :, None]).flatten(0, 1)
        if slot_experts.numel() < self.n_experts:  # a few tokens (decoding): run each slot on its own expert
            routed_out = self.experts.for_slots(slots, slot_experts)
        else:  # sort the slots by expert, run each expert once on its group, and unsort
            order = slot_experts.argsort(stable=True)
            back = torch.empty_like(order).scatter_(0, order, torch.arange(len(order), device=x.device))  # inverse
            routed_out = self.experts(permute_rows(slots, order, back), counts.cumsum(0).to(torch.int32))
            routed_out = permute_rows(routed_out, back, order)
        # Each token's output: the shared expert's plus the sum of its top_k routed experts'.
        out = self.shared_expert(x) + routed_out.view(-1, self.top_k, dim).sum(1)
        if not self.training:  # the balancing loss only matters for training; generation skips its ops
            return out.view(B, T, dim), None
        slot_share = counts.float() / slot_experts.numel()             # f_i
        mean_prob = torch.softmax(logits.float(), dim=-1).mean(0)      # P_i
        aux_loss = self.n_experts * (slot_share * mean_prob).sum()
        return out.view(B, T, dim), aux_loss


class Block(nn.Module):
    """One pre-norm decoder layer: h = x + attn(norm(x)); out = h + ffn(norm(h)). The FFN is an MoE on every
    `moe_every`-th layer and a dense SwiGLU elsewhere; attention is NoPE on every `nope_every`-th layer."""

    def __init__(self, config, layer):
        super().__init__()
        self.is_moe = (layer + 1) % config["moe_every"] == 0
        self.use_rope = (layer + 1) % config["nope_every"] != 0
        self.attn_norm = RMSNorm(config["dim"], config["norm_eps"])
        self.attn = Attention(config, self.use_rope)
        self.ffn_norm = RMSNorm(config["dim"], config["norm_eps"])
        self.ffn = MoE(config) if self.is_moe else FeedForward(config["dim"], config["ffn_hidden"])

    def forward(self, x, rope, cache=None, offset=0):
        h = x + self.attn(self.attn_norm(x), rope, cache, offset)
        if self.is_moe:
            ffn_out, aux_loss = self.ffn(self.ffn_norm(h))
            return h + ffn_out, aux_loss
        return h + self.ffn(self.ffn_norm(h)), None


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

    def forward(self, tokens=None, targets=None, embeds=None, cache=None):
        """tokens: (B, T) ids, or embeds: (B, T, dim) ready-made input vectors (phase 2 puts image features
        among them). targets: (B, T) next-token ids, -100 where no loss is taken.
        Returns (logits (B, T, vocab), language-model loss or None, mean MoE load-balancing loss or None)."""
        x = self.embed_tokens(tokens) if embeds is None else embeds    # (B, T, dim)
        offset = cache.length if cache is not None else 0
        if offset + x.shape[1] > self.config["context"]:
            raise ValueError(f"sequence of {offset + x.shape[1]} tokens exceeds the context of "
                             f"{self.config['context']}")
        aux_losses = []
        for layer in self.layers:
            x, aux_loss = layer(x, (self.rope_cos, self.rope_sin), cache, offset)
            if aux_loss is not None:
                aux_losses.append(aux_loss)
        if cache is not None:
            cache.length += x.shape[1]
        logits = self.lm_head(self.norm(x))                           # (B, T, vocab)
        if targets is None:
            return logits, None, None
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        aux = torch.stack(aux_losses).mean() if aux_losses else torch.zeros((), device=x.device)
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
        self.keys = {id(l.attn): torch.zeros(shape, device=device, dtype=dtype) for l in model.layers}
        self.values = {id(l.attn): torch.zeros(shape, device=device, dtype=dtype) for l in model.layers}
        self.length = 0

    def update(self, attn, k, v, offset):
        """Store this step's k, v (B, n_kv_heads, T, head_dim) at `offset`; return all keys and values so far."""
        end = offset + k.shape[2]
        self.keys[id(attn)][:, :, offset:end] = k
        self.values[id(attn)][:, :, offset:end] = v
        return self.keys[id(attn)][:, :, :end], self.values[id(attn)][:, :, :end]


def sample_next(logits, temperature=0.0, top_k=0, top_p=1.0, generator=None):
    """Pick the next token from logits (B, vocab): greedy when temperature is 0, else sample after
    temperature scaling, top-k and top-p (nucleus) filtering."""
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
             stop_ids=(EOS_ID, EOT_ID), generator=None):
    """Continue the prompt `tokens` (B, T) - or the ready-made input vectors `embeds` (B, T, dim) - with the KV
    cache. Returns the new ids (B, <= max_new_tokens); generation stops when every row has hit a stop id."""
    prompt_len = (tokens if embeds is None else embeds).shape[1]
    batch = (tokens if embeds is None else embeds).shape[0]
    max_new_tokens = min(max_new_tokens, model.config["context"] - prompt_len)
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
    """Mean validation loss over the fixed eval batches, and the experts' share of routed slots."""
    model.eval()
    losses, counts = [], {}
    for batch in batches.eval_batches():
        with autocast:
            _, loss, _ = model(**batch)
        losses.append(loss.float())
        for name, module in model.named_modules():
            if isinstance(module, MoE):
                counts[name] = counts.get(name, 0) + module.tokens_per_expert.float()
    model.train()
    shares = torch.stack([c / c.sum() for c in counts.values()]) if counts else None
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


def train(config, model, batches, evaluate_extra=None, lr_scale=None, checkpoint_extra=None):
    """The hand-written training loop shared by every phase.

    model(**batch) must return (logits, loss, aux_loss or None); batches gives .next("train"), .eval_batches(),
    .state_dict() and .load_state_dict(). evaluate_extra(model) may add metrics (e.g. caption accuracy) to
    each evaluation.
    Returns the list of (step, training loss) pairs, for tests.
    """
    rank, world, device = setup_device(config)
    master = rank == 0
    model.to(device)
    raw_model = model
    amp_dtype = autocast_dtype(config, device)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    optimizer = make_optimizer(raw_model, config, device, lr_scale)
    ckpt_path = os.path.join(config["out_dir"], "ckpt.pt")
    step, best_val, history = 0, float("inf"), []
    if config["resume"]:
        state = load_checkpoint(ckpt_path, make_it="the same command without --resume=True")
        load_model_state(raw_model, state["model"], ckpt_path)
        settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        try:
            optimizer.load_state_dict(state["optimizer"])
        except ValueError as error:  # another number or size of parameter groups
            raise TrainingError(f"{ckpt_path}'s optimizer state does not fit this run ({error}); resume "
                                f"with the settings it was trained with (e.g. --weight_decay, "
                                f"--projector_lr_scale)") from None
        for group, setting in zip(optimizer.param_groups, settings):
            group.update(setting)  # this run's weight decay, betas and lr scale, not the saved ones
        data_states = state["batches"]  # a list with one state per rank: each rank draws its own data
        data_states = data_states if isinstance(data_states, list) else [data_states]  # older checkpoints
        if len(data_states) == world:
            batches.load_state_dict(data_states[rank])
        elif master:
            print(f"note: {ckpt_path} was saved by {len(data_states)} process(es), this run has {world}: "
                  f"every rank restarts its data order from its seed", flush=True)
        torch.set_rng_state(state["rng"])
        if state.get("scaler"):  # fp16's loss scale, as it had adapted
            scaler.load_state_dict(state["scaler"])
        step, best_val = state["step"], state["best_val_loss"]
        if master:
            print(f"resumed from {ckpt_path} at step {step}", flush=True)
    if config["compile"]:
        model = torch.compile(model)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    mfu_denominator = peak_flops(device)
    flops = flops_per_token(raw_model.config) if mfu_denominator else 0

    def checkpoint(val_loss, data_states):
        state = dict(model=raw_model.state_dict(), optimizer=optimizer.state_dict(), config=config, step=step,
                     best_val_loss=best_val, val_loss=val_loss, rng=torch.get_rng_state(),
                     scaler=scaler.state_dict(), batches=data_states, **(checkpoint_extra or {}))
        save_checkpoint(ckpt_path, state)

    def run_eval():
        nonlocal best_val
        val_loss, shares = evaluate(raw_model, batches, autocast)
        if not math.isfinite(val_loss):
            raise TrainingError(f"validation loss is {val_loss} at step {step}; the last good checkpoint "
                                f"({ckpt_path}) is kept. Try a lower --lr.")
        best_val = min(best_val, val_loss)
        extra = evaluate_extra(raw_model) if evaluate_extra else {}
        # Rank 0 writes the checkpoint, but every rank's data order must be in it for a resume to continue.
        data_states = [batches.state_dict()]
        if world > 1:
            data_states = [None] * world
            torch.distributed.all_gather_object(data_states, batches.state_dict())
        if master:
            usage = f" | experts min/max share {shares.min():.3f}/{shares.max():.3f}" if shares is not None else ""
            metrics = "".join(f" | {k} {v:.3f}" for k, v in extra.items())
            print(f"eval step {step}: val loss {val_loss:.4f} | perplexity {math.exp(min(val_loss, 50)):.2f}"
                  f"{usage}{metrics}", flush=True)
            checkpoint(val_loss, data_states)

    raw_model.train()
    start_step, t0, started, processed = step, time.time(), time.time(), 0
    while step < config["max_iters"]:
        if step % config["eval_interval"] == 0 and step > start_step:
            run_eval()
            t0, processed = time.time(), 0  # keep evaluation time out of the tokens/s figure
        lr = lr_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        for micro_step in range(config["grad_accum_steps"]):
            batch = batches.next("train")
            processed += batch["tokens"].numel() if "tokens" in batch else len(next(iter(batch.values())))
            last = micro_step == config["grad_accum_steps"] - 1
            # DDP all-reduces gradients on every backward; skip it on all but the last micro-step.
            sync = model.no_sync() if world > 1 and not last else contextlib.nullcontext()
            with sync:
                with autocast:
                    _, loss, aux_loss = model(**batch)
                    total = loss if aux_loss is None else loss + config["aux_loss_coef"] * aux_loss
                    total = total / config["grad_accum_steps"]
                scaler.scale(total).backward()
        loss_value = loss.detach().float()
        if world > 1:  # the mean over ranks: it is what gets logged, and a NaN on one rank stops every rank
            torch.distributed.all_reduce(loss_value)
            loss_value /= world
        loss_value = loss_value.item()
        if not math.isfinite(loss_value):
            raise TrainingError(f"loss is {loss_value} at step {step}; stopped, and the last good checkpoint "
                                f"({ckpt_path}) is kept. Try a lower --lr or --dtype=float32.")
        if config["grad_clip"] > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), config["grad_clip"])
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        history.append((step, loss_value))
        step += 1
        if master and (step % config["log_interval"] == 0 or step == 1):
            speed, t0, processed = processed * world / (time.time() - t0), time.time(), 0
            aux = f" | aux {aux_loss.item():.3f}" if aux_loss is not None else ""
            unit = "tok/s" if "tokens" in batch else "samples/s"
            line = f"step {step:>6} | loss {loss_value:.4f}{aux} | lr {lr:.2e} | {speed:,.0f} {unit}"
            if mfu_denominator:  # only for GPUs whose peak FLOP/s peak_flops knows; speed is all GPUs'
                line += f" | MFU {100 * speed * flops / (world * mfu_denominator):.1f}%"
            if device.type == "cuda":
                line += f" | mem {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
            print(line, flush=True)
        if config["max_seconds"]:
            out_of_time = time.time() - started > config["max_seconds"]
            if world > 1:  # every rank must stop at the same step (or the others wait forever in an all-reduce)
                flag = torch.tensor(float(out_of_time), device=device)
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)  # any rank's clock
                out_of_time = bool(flag.item())
            if out_of_time:
                if master:
                    print(f"stopping at step {step}: max_seconds={config['max_seconds']} reached", flush=True)
                break
    if step > start_step or not os.path.exists(ckpt_path):
        run_eval()
    if world > 1:
        torch.distributed.barrier()
    return history


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
                          rank, config["eval_iters"])
    copy_test = (lambda m: copy_losses(m, tokenizer)) if config["text_source"] == "shapes" else None
    train(config, model, batches, evaluate_extra=copy_test, checkpoint_extra=dict(tokenizer=tokenizer.to_str()))
    if rank == 0:
        print(f"saved {os.path.join(config['out_dir'], 'ckpt.pt')}; try: python sample.py --prompt \"a red\"")


if __name__ == "__main__":
    run(main)
