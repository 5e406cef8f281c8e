"""How fast is it? Every figure is a ratio of two things measured in the same run on the same machine.

    python bench.py                           # the default Shapes World sizes: ~1 min on 2 idle CPU cores, ~4 busy
    python bench.py --batch_size=8 --dim=256  # any config key, as for pretrain.py
    python bench.py --preset=llama4_seed      # the seed's sizes (on CUDA; far too big for a CPU)
    python bench.py --rows=cuda --profile     # only row 5, then a torch.profiler table of its largest batch
    python bench.py --help                    # every key it reads

It prints one line naming the machine and one markdown table, row by row, ready to paste into the README:

  1. a training step (forward, backward, AdamW) of our `pretrain.Transformer` against transformers'
     `Llama4ForCausalLM` holding the same config and weights (export_hf), at the preset's size and a mid size;
  2. one MoE layer against a dense SwiGLU with as many active parameters, forward + backward;
  3. generation with the KV cache against re-running the whole sequence for every new token, for text and
     for captions after 196 image tokens, one image at a time and 16 at once;
  4. a phase-2 training step on cached encoder features against running the frozen encoder every step;
     a phase-3 step of 32 random conversations as one padded batch against the same rows batched by length,
     and that step with the last block run only at the positions with a target against at every position;
  5. on CUDA only: the seed model's training tokens/s, MFU and peak memory with bf16 autocast and torch.compile.

A shared machine is noisy: another process can slow us down several times over for a while. So each
comparison warms both sides up, then times them alternately (A B A B ...) so that a change of load hits both,
and reports the median of each side; the ratio is the median of the per-pair ratios, with the smallest and
largest in brackets - a wide bracket means the machine was busy. Rows 1-4 run in fp32 on the config's device
(on a GPU these small models are bound by kernel launches, so their targets are CPU targets); row 5 in bf16.
"""
import gc
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from align import (VLM, CaptionBatches, batches_by_length, build_vision_transformer, caption_images, caption_sequence,
                   right_pad)
from config import ConfigError, get_config, run
from data.prepare_text import BOS_ID, IMAGE_ID, train_tokenizer
from export_hf import hf_config, hf_state_dict
from instruct import render_conversation, shapes_conversations
from pretrain import (FeedForward, MoE, Transformer, autocast_dtype, flops_per_token, generate, loss_shares,
                      make_optimizer, peak_flops, setup_device)

# A model between the Shapes World default (dim 128, 4 layers) and the seed (dim 768, 12 layers): big enough
# that matrix multiplies, not Python overhead, dominate a CPU step, small enough to time in seconds.
MID_SIZE = dict(dim=256, n_layers=8, n_heads=8, n_kv_heads=4, ffn_hidden=512, moe_hidden=256, context=256)
NEW_TOKENS = 64          # generated per measurement (row 3)
TEXT_PROMPT = 16         # prompt tokens of the text generation row
IMAGE_GRID = 14          # 14 x 14 = 196 patch tokens, as ViT-B/16 gives at 224 px
CAPTION_BATCH = 16       # row 3: captions of this many images at once, besides one at a time
CUDA_BATCH_SIZES = (0, 32, 64)  # row 5: the preset's own batch (0), then batches that fill a big GPU


# ----------------------------------------------------------------------------------------------------------
# Timing: alternate the two sides, take medians
# ----------------------------------------------------------------------------------------------------------

def seconds(fn, device):
    """Wall-clock seconds of one call of fn. CUDA runs asynchronously, so wait for its queued kernels first."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def compare(a, b, device, repeats, warmup=1):
    """Time a and b alternately, `repeats` times each after `warmup` untimed calls of each (the first calls
    allocate memory and fill caches). Returns (median seconds of a, median seconds of b, the ratios b / a
    of each pair): a pair is measured back to back, so its ratio is the least disturbed by drifting load."""
    for _ in range(warmup):
        a(), b()
    pairs = [(seconds(a, device), seconds(b, device)) for _ in range(repeats)]
    return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs), [b / a for a, b in pairs]


def ratio_text(ratios, unit="×"):
    """The median ratio with the smallest and largest pair in brackets, e.g. 2.41× (2.30–2.62)."""
    return f"{statistics.median(ratios):.2f}{unit} ({min(ratios):.2f}–{max(ratios):.2f})"


def verdict(value, target, at_least=True):
    """The target column: the target and whether this run met it."""
    value = round(value, 2)  # judged at the precision the table shows
    met = value >= target if at_least else value <= target
    return f"{'≥' if at_least else '≤'} {target:g}× {'✓' if met else '✗ missed'}"


def busy_share(seconds=1.0):
    """The share of all cores that other processes kept busy over `seconds` before we start, from /proc/stat
    (Linux; None elsewhere). The load average would lag by a minute."""
    if not os.path.exists("/proc/stat"):
        return None

    def idle_and_total():
        with open("/proc/stat") as f:
            ticks = [int(t) for t in f.readline().split()[1:]]   # user nice system idle iowait ...
        return ticks[3] + ticks[4], sum(ticks)

    idle0, total0 = idle_and_total()
    time.sleep(seconds)
    idle1, total1 = idle_and_total()
    return 1 - (idle1 - idle0) / max(1, total1 - total0)


def machine_line(device):
    """CPU model, cores, torch version and threads, and how busy other processes kept the CPU as we started."""
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    line = f"machine: {cpu}, {os.cpu_count()} cores | torch {torch.__version__} | threads {torch.get_num_threads()}"
    busy = busy_share()
    if busy is not None:
        line += f" | other processes used {100 * busy:.0f}% of the CPU at start"
        if device.type == "cpu" and busy > 0.25:
            # With as many threads as cores, every op waits for whichever of its threads another process has
            # descheduled, so op-heavy code (MoE routing, decoding) slows far more than big matmuls.
            line += (" (busy: figures are skewed against the side with more small ops; rerun idle or with "
                     "OMP_NUM_THREADS=1)")
    if device.type == "cuda":
        line += f" | {torch.cuda.get_device_name(device)}"
    return line


# ----------------------------------------------------------------------------------------------------------
# 1. Training throughput: ours against transformers' Llama4ForCausalLM
# ----------------------------------------------------------------------------------------------------------

def random_batch(config, device, generator):
    """A (batch_size, context) batch of random token ids; speed does not depend on what the tokens say."""
    shape = (config["batch_size"], config["context"])
    tokens = torch.randint(config["vocab_size"], shape, generator=generator).to(device)
    targets = torch.randint(config["vocab_size"], shape, generator=generator).to(device)
    return dict(tokens=tokens, targets=targets)


def training_step(model, optimizer, loss_of):
    """One optimizer step as pretrain.train takes it: loss, backward, gradient clipping at 1.0, AdamW."""
    def step():
        loss_of(model).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def our_loss(batch, config):
    """The loss pretrain.train minimises: language-model loss + aux_loss_coef x the MoE balancing loss."""
    def loss_of(model):
        _, loss, aux_loss = model(**batch)
        return loss + config["aux_loss_coef"] * aux_loss
    return loss_of


def everywhere_loss(batch, config):
    """our_loss on a VLM batch with the last block at every position: Transformer.forward before at_targets."""
    def loss_of(vlm):
        _, loss, aux_loss = vlm.llm(embeds=vlm.embed(batch["tokens"], batch["features"]), targets=batch["targets"])
        return loss + config["aux_loss_coef"] * aux_loss
    return loss_of


def transformers_loss(batch):
    """The same cross-entropy on transformers' logits. use_cache=False: a training forward keeps no KV cache."""
    def loss_of(model):
        logits = model(input_ids=batch["tokens"], use_cache=False).logits
        return F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())
    return loss_of


def transformers_twin(model, device):
    """transformers' Llama4ForCausalLM with our model's config and weights: export_hf's config.json and its
    renaming, loaded in memory rather than through a folder."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig
    twin = Llama4ForCausalLM(Llama4TextConfig(**hf_config(model.config, torch.float32)))
    twin.load_state_dict(hf_state_dict(model.state_dict()))
    return twin.to(device)


def training_row(name, config, device, repeats):
    setting = (f"{name}: dim {config['dim']}, {config['n_layers']} layers, "
               f"batch {config['batch_size']} × {config['context']}")
    torch.manual_seed(0)
    ours = Transformer(config).to(device)
    try:
        twin = transformers_twin(ours, device)
    except ImportError:  # transformers is a test-only extra
        return ["training tokens/s, ours vs transformers' Llama4ForCausalLM", setting, "—", "—",
                "skipped: transformers is not installed (pip install -r requirements-test.txt)", "≥ 2×"]
    batch = random_batch(config, device, torch.Generator().manual_seed(0))
    ours_step = training_step(ours, make_optimizer(ours, config, device), our_loss(batch, config))
    twin_step = training_step(twin, make_optimizer(twin, config, device), transformers_loss(batch))
    ours_s, twin_s, ratios = compare(ours_step, twin_step, device, repeats)
    tokens = batch["tokens"].numel()
    return ["training tokens/s, ours vs transformers' Llama4ForCausalLM", setting, f"{tokens / ours_s:,.0f}",
            f"{tokens / twin_s:,.0f}", ratio_text(ratios), verdict(statistics.median(ratios), 2)]


# ----------------------------------------------------------------------------------------------------------
# 2. One MoE layer against a dense SwiGLU with the same active parameters
# ----------------------------------------------------------------------------------------------------------

def moe_row(name, config, device, repeats):
    """A token meets top_k routed experts and the shared expert, each of moe_hidden units, so the dense layer
    with as many active parameters has (top_k + 1) * moe_hidden. The MoE's extra cost is the routing: the
    router, counting the slots per expert, and permuting them into expert order and back."""
    torch.manual_seed(0)
    moe = MoE(config).to(device)
    hidden = (config["top_k"] + 1) * config["moe_hidden"]
    dense = FeedForward(config["dim"], hidden).to(device)
    # Transformer's init. A bare MoE leaves its experts as torch.empty, and leftover memory may hold denormal
    # floats, which a CPU multiplies ~100x slower.
    with torch.no_grad():
        for param in [*moe.parameters(), *dense.parameters()]:
            param.normal_(0, 0.02)
    x = torch.randn(config["batch_size"], config["context"], config["dim"], device=device, requires_grad=True)

    def moe_pass():
        out, aux_loss, _ = moe(x)
        torch.autograd.grad(out.sum() + aux_loss, [x, *moe.parameters()])

    def dense_pass():
        torch.autograd.grad(dense(x).sum(), [x, *dense.parameters()])

    moe_s, dense_s, ratios = compare(moe_pass, dense_pass, device, repeats)
    ratios = [1 / r for r in ratios]  # MoE time over dense time
    return ["MoE layer vs dense SwiGLU of equal active params, forward + backward (ms)",
            f"{name}: {x.shape[0] * x.shape[1]} tokens, dim {config['dim']}, MoE {config['n_experts']} × "
            f"{config['moe_hidden']} top-{config['top_k']} + shared vs dense {hidden}",
            f"{1000 * moe_s:.1f}", f"{1000 * dense_s:.1f}", ratio_text(ratios, "× the dense time"),
            verdict(statistics.median(ratios), 1.5, at_least=False)]


# ----------------------------------------------------------------------------------------------------------
# 3. Generation: the KV cache against full recompute
# ----------------------------------------------------------------------------------------------------------

@torch.no_grad()
def generate_by_recompute(llm, embeds, max_new_tokens):
    """Greedy generation without a cache: every new token re-runs the whole sequence so far, prefix
    included. embeds: (B, T, dim), the prompt's input vectors."""
    for _ in range(max_new_tokens):
        logits, _, _ = llm(embeds=embeds)
        next_token = logits[:, -1].argmax(-1, keepdim=True)            # (B, 1)
        embeds = torch.cat([embeds, llm.embed_tokens(next_token)], dim=1)


def image_vlm(config, device):
    """A VLM with random weights whose image is 196 tokens: a 112 px ViT with 8 px patches (a 14 x 14 grid,
    as ViT-B/16 at 224 px) and no pixel shuffle. The LLM's context fits the image, two special tokens and
    the caption."""
    vision = dict(config, vision_model="shapes_vit", image_size=8 * IMAGE_GRID, pixel_shuffle=1)
    llm = Transformer(dict(config, context=max(config["context"], IMAGE_GRID ** 2 + NEW_TOKENS + 2)))
    return VLM(llm, build_vision_transformer(vision), vision).to(device).eval().requires_grad_(False)


def aten_calls(fn):
    """How many ATen operators fn() dispatches (counted by a TorchDispatchMode that passes every call on)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.calls


def generation_rows(config, device, repeats):
    """Prints a row each, as measured: text at batch 1; captions at batch 1 (caption.py, one image) and at
    CAPTION_BATCH images at once (as align.py's evaluation captions its held-out scenes). Each row also counts
    the ATen operators that one decoding step dispatches, and the mean time per call that the cached side's
    speed implies: a small model on a CPU spends a few microseconds on each call whatever its size, so at
    batch 1 the count, not the arithmetic, sets the speed."""
    torch.manual_seed(0)
    vlm = image_vlm(config, device)
    llm = vlm.llm
    prompt = torch.randint(7, config["vocab_size"], (1, TEXT_PROMPT), device=device)  # ids past the specials
    pixels = torch.randn(CAPTION_BATCH, 3, vlm.vit.image_size, vlm.vit.image_size, device=device)
    features = vlm.image_features(pixels)
    prefix = torch.tensor([[BOS_ID] + [IMAGE_ID] * vlm.n_image_tokens] * CAPTION_BATCH, device=device)
    # stop_ids=(): random weights may pick the end token early; every run must generate all NEW_TOKENS.
    cases = [("text", 1, f"a {TEXT_PROMPT}-token prompt",
              lambda new=NEW_TOKENS: generate(llm, prompt, new, stop_ids=()),
              lambda: generate_by_recompute(llm, llm.embed_tokens(prompt), NEW_TOKENS))]
    for batch in (1, CAPTION_BATCH):
        cases.append(("caption", batch, f"{vlm.n_image_tokens} image tokens",
                      lambda new=NEW_TOKENS, b=batch: caption_images(vlm, features[:b], new, stop_ids=()),
                      lambda b=batch: generate_by_recompute(llm, vlm.embed(prefix[:b], features[:b]), NEW_TOKENS)))
    for name, batch, where, cached, recompute in cases:
        cached_s, recompute_s, ratios = compare(cached, recompute, device, repeats)
        target = verdict(statistics.median(ratios), 10) if name == "caption" else "—"
        calls = aten_calls(cached) - aten_calls(lambda: cached(NEW_TOKENS - 1))
        setting = (f"batch {batch}, {NEW_TOKENS} new tokens after {where}, dim {config['dim']}, "
                   f"{config['n_layers']} layers; a decoding step is {calls} ATen calls, "
                   f"≈ {1e6 * cached_s / NEW_TOKENS / calls:.1f} µs each")
        print_row([f"generation tokens/s, {name}: KV cache vs full recompute", setting,
                   f"{batch * NEW_TOKENS / cached_s:,.0f}", f"{batch * NEW_TOKENS / recompute_s:,.0f}",
                   ratio_text(ratios), target])


# ----------------------------------------------------------------------------------------------------------
# 4. Phase 2: cached encoder features against encoding the images every step
# ----------------------------------------------------------------------------------------------------------

def phase2_row(config, device, repeats):
    """align.py's training step (the projector learns; encoder and LLM are frozen) on hand-built caption
    batches: one with the images' features precomputed, as cache_features=True reads them from disk, one
    with the pixels, which the frozen encoder turns into features inside the step."""
    torch.manual_seed(0)
    llm = Transformer(config).requires_grad_(False)
    vlm = VLM(llm, build_vision_transformer(config), config).to(device).train()
    generator = torch.Generator().manual_seed(0)
    captions = torch.randint(7, config["vocab_size"], (config["batch_size"], 16), generator=generator)
    sequences = [caption_sequence(ids, vlm.n_image_tokens) for ids in captions.tolist()]
    tokens = torch.tensor([s[0] for s in sequences], device=device)
    targets = torch.tensor([s[1] for s in sequences], device=device)
    images = torch.randn(config["batch_size"], 3, config["image_size"], config["image_size"], device=device)
    features = vlm.image_features(images).half()  # the cache stores float16
    cached = training_step(vlm, make_optimizer(vlm, config, device),
                           our_loss(dict(tokens=tokens, targets=targets, features=features), config))
    uncached = training_step(vlm, make_optimizer(vlm, config, device),
                             our_loss(dict(tokens=tokens, targets=targets, images=images), config))
    cached_s, uncached_s, ratios = compare(cached, uncached, device, repeats)
    return ["phase-2 step time, cached features vs encoder every step (ms)",
            f"batch {config['batch_size']}, {config['vision_model']} {config['image_size']} px, "
            f"{vlm.n_image_tokens} image tokens + {tokens.shape[1] - vlm.n_image_tokens} text",
            f"{1000 * cached_s:.1f}", f"{1000 * uncached_s:.1f}", ratio_text(ratios, "× faster"), "—"]


def phase3_row(config, device, repeats, steps=8):
    """instruct.py's training step on Shapes World conversations (random weights): 32 random conversations as
    one batch, padded to its longest, against the same 32 rows as the default runs them (group_by_length=2,
    grad_accum_steps=2): two micro-batches of 16 of similar length, each weighted by its share of the targets
    (pretrain.loss_shares). Token counts come from a BPE tokenizer trained on the conversations' own text."""
    torch.manual_seed(0)
    data = shapes_conversations("train", 2000, 0, config["image_size"])
    tokenizer = train_tokenizer([f"{q} {a}" for _, turns in data.pairs for q, a in turns], config["vocab_size"])
    vlm = VLM(Transformer(config), build_vision_transformer(config), config).to(device).train()
    sequences = [render_conversation(turns, tokenizer, vlm.n_image_tokens, config["context"]) for _, turns in data.pairs]
    lengths = [len(tokens) for tokens, _ in sequences]
    generator = torch.Generator().manual_seed(0)
    drawn = [batches_by_length(lengths, 16, 2, generator) for _ in range(steps)]  # each step: 2 x 16 rows
    features = vlm.image_features(torch.randn(32, 3, config["image_size"], config["image_size"], device=device))

    def batch(rows):
        tokens, targets = right_pad([sequences[row] for row in rows])
        return dict(tokens=tokens.to(device), targets=targets.to(device), features=features[:len(rows)])
    whole = [batch(halves[0] + halves[1]) for halves in drawn]
    pieces = [[batch(rows) for rows in halves] for halves in drawn]
    one_optimizer, two_optimizer = make_optimizer(vlm, config, device), make_optimizer(vlm, config, device)

    def one_batch():
        for step in whole:
            training_step(vlm, one_optimizer, our_loss(step, config))()

    def by_length(loss=our_loss):
        for step in pieces:
            for micro, share in zip(step, loss_shares(CaptionBatches, step, world=1)):
                (loss(micro, config)(vlm) * share).backward()
            torch.nn.utils.clip_grad_norm_(vlm.parameters(), 1.0)
            two_optimizer.step()
            two_optimizer.zero_grad(set_to_none=True)
    length_s, whole_s, ratios = compare(by_length, one_batch, device, repeats)
    padded = lambda batches: sum(b["tokens"].numel() for b in batches)
    micro_batches = [p for step in pieces for p in step]
    targets = sum(int((p["targets"] != -100).sum()) for p in micro_batches)
    at_s, everywhere_s, at_ratios = compare(by_length, lambda: by_length(everywhere_loss), device, repeats)
    return [["phase-3 step time, by length (2 x 16) vs one random batch of 32 (ms)",
             f"Shapes World conversations, {statistics.mean(lengths):.0f} tokens on average; tokens with padding "
             f"{padded(micro_batches) / padded(whole):.2f}× of one batch's",
             f"{1000 * length_s / steps:.1f}", f"{1000 * whole_s / steps:.1f}", ratio_text(ratios, "× faster"), "—"],
            ["phase-3 step time, the last block only at the targets (at_targets) vs everywhere (ms)",
             f"the same steps by length; {targets / padded(micro_batches):.2f} of the "
             f"positions have a target", f"{1000 * at_s / steps:.1f}", f"{1000 * everywhere_s / steps:.1f}",
             ratio_text(at_ratios, "× faster"), "—"]]


# ----------------------------------------------------------------------------------------------------------
# 5. CUDA: the seed model's throughput, MFU and memory
# ----------------------------------------------------------------------------------------------------------

def cuda_rows(device, repeats, batch_sizes, profile=False):
    """MFU = tokens/s × FLOPs per token / the GPU's peak bf16 FLOP/s, with pretrain.flops_per_token's count:
    6 × N_active (the matmul parameters, embedding excluded) + attention, 12 × heads × head_dim per key a
    query attends to. Prints one row per batch size as it is measured: the preset's own (7 sequences, sized
    for the seed's small GPU) and larger ones that fill a big GPU. With profile=True, a torch.profiler table
    of the last one follows."""
    figure = "llama4_seed training, bf16 autocast + torch.compile"
    formula = "MFU = tok/s × (6·N_active matmul params + Σ layers 12·heads·head_dim·(span+1)/2) / peak bf16"
    if device.type != "cuda":
        print_row([figure, formula, "—", "—", "skipped: needs CUDA", "≥ 40% MFU"])
        return
    for batch_size in batch_sizes:
        gc.collect()  # free the last batch size's model before measuring this one's peak memory
        torch.cuda.empty_cache()
        batch_arg = [f"--batch_size={batch_size}"] if batch_size else []  # 0: the preset's own
        config = get_config("pretrain", ["--preset=llama4_seed"] + batch_arg)
        torch.compiler.reset()  # a fresh compile for each batch size, not one made dynamic by the last
        torch.manual_seed(0)
        model = Transformer(config).to(device)
        batch = random_batch(config, device, torch.Generator().manual_seed(0))
        autocast = torch.autocast("cuda", dtype=autocast_dtype(config, device))

        def loss_of(compiled):
            with autocast:
                return our_loss(batch, config)(compiled)

        step = training_step(torch.compile(model), make_optimizer(model, config, device), loss_of)
        started = time.perf_counter()
        for _ in range(3):  # the first calls compile
            step()
        torch.cuda.synchronize(device)
        compile_s = time.perf_counter() - started
        torch.cuda.reset_peak_memory_stats(device)
        step_s = statistics.median(seconds(step, device) for _ in range(repeats))
        tokens_per_s = batch["tokens"].numel() / step_s
        peak = peak_flops(device)
        mfu = tokens_per_s * flops_per_token(config) / peak if peak else None
        memory = torch.cuda.max_memory_allocated(device) / 2**30
        print_row([figure, f"{formula}; batch {config['batch_size']} × {config['context']}",
                   f"{tokens_per_s:,.0f} tok/s", "—",
                   (f"MFU {100 * mfu:.1f}%" if mfu else "MFU: peak unknown") + f", step {1000 * step_s:.1f} ms, "
                   f"peak memory {memory:.1f} GiB, compile + warm-up {compile_s:.0f} s",
                   f"≥ 40% MFU {'✓' if mfu and mfu >= 0.4 else '✗ missed'}"])
        if profile and batch_size == batch_sizes[-1]:
            print_profile(step, device)


def print_profile(step, device, steps=3):
    """Where a step's GPU time goes: torch.profiler's table of the kernels and ops with the most self time
    over a few steps, and how busy the GPU was (the sum of kernel times over the wall time)."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall = sum(seconds(step, device) for _ in range(steps))
    events = prof.key_averages()
    kernel_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    print(f"profile of {steps} steps: wall {1000 * wall / steps:.1f} ms per step, GPU kernels "
          f"{kernel_us / 1000 / steps:.1f} ms per step ({100 * kernel_us / 1e6 / wall:.0f}% busy)", flush=True)
    print(events.table(sort_by="self_device_time_total", row_limit=45, max_name_column_width=70), flush=True)


# ----------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------

def print_row(cells):
    print("| " + " | ".join(cells) + " |", flush=True)


ROWS = ("training", "moe", "generation", "phase2", "cuda")


def chosen_rows(config):
    """The set of row names that --rows names (comma-separated)."""
    rows = set(config["rows"].split(","))
    if not rows <= set(ROWS):
        raise ConfigError(f"--rows takes a comma-separated subset of {','.join(ROWS)}, got {config['rows']}")
    return rows


def main(argv=None):
    config = get_config("bench", argv)  # the model and loop keys as for pretrain.py, plus --rows and --profile
    align_config = get_config("align", argv)  # phase 2's own batch size and encoder
    rows, profile = chosen_rows(config), config["profile"]
    _, _, device = setup_device(config)
    started = time.perf_counter()
    print(machine_line(device), flush=True)
    print_row(["figure: A vs B", "setting", "A", "B", "ratio (min–max)", "target"])
    print_row(["---"] * 4 + ["---:", "---"])
    mid = dict(config, **MID_SIZE)
    # Each row is printed as soon as it is measured, so a long run shows its progress.
    if "training" in rows:
        print_row(training_row("preset", config, device, repeats=7))
        print_row(training_row("mid size", mid, device, repeats=5))
    if "moe" in rows:
        print_row(moe_row("preset", config, device, repeats=11))
        print_row(moe_row("mid size", mid, device, repeats=9))
    if "generation" in rows:
        generation_rows(config, device, repeats=5)
    if "phase2" in rows:
        print_row(phase2_row(align_config, device, repeats=9))
        for row in phase3_row(get_config("instruct", argv), device, repeats=5):
            print_row(row)
    if "cuda" in rows:
        cuda_rows(device, repeats=10, batch_sizes=CUDA_BATCH_SIZES, profile=profile)
    print(f"bench took {(time.perf_counter() - started) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    run(main)
