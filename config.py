"""One plain-Python config for every phase, with named presets and --key=value overrides.

    python pretrain.py                                   # the default preset: Shapes World on a CPU
    python pretrain.py --preset=llama4_seed              # the seed's full recipe
    python pretrain.py --max_iters=200 --batch_size=8    # any entry can be overridden (--key value works too)

Resolution order: CONFIG < PHASE_DEFAULTS[phase] < PRESETS[preset] < PRESETS[preset][phase] < command line.
`python SCRIPT.py --help` lists the keys that script reads, with their defaults and meanings (from this file).
Every value on the command line is checked against the type of its default.
"""
import sys

CONFIG = dict(
    # --- model: the language model (README: How the model works); these defaults are the tiny Shapes World model ---
    vocab_size=512,         # tokenizer and embedding size; special tokens sit at fixed ids 0..6
    dim=128,                # width of the residual stream
    n_layers=4,             # transformer blocks
    n_heads=4,              # query heads
    n_kv_heads=2,           # key/value heads shared by groups of query heads (GQA)
    head_dim=64,            # width of each head; 0 means dim // n_heads. 64 (not 128 // 4 = 32): see README
    ffn_hidden=256,         # hidden size of the dense SwiGLU layers
    moe_hidden=128,         # hidden size of each routed expert and of the shared expert
    n_experts=8,            # routed experts per MoE layer
    top_k=2,                # experts each token is sent to
    moe_every=2,            # layers 1, 3, 5, ... are MoE (Llama 4's interleave_moe_layer_step)
    nope_every=4,           # layers 3, 7, 11, ... have no RoPE and attend globally (iRoPE)
    rope_theta=10000.0,     # RoPE base: pair i of a head turns by pos * rope_theta^(-2i/head_dim)
    attn_chunk=128,         # RoPE layers attend only within chunks of this many positions
    norm_eps=1e-5,          # RMSNorm's epsilon (also of the weightless q/k norm)
    attn_scale=0.1,         # NoPE-layer query temperature: 1 + attn_scale * log(floor((pos+1)/floor_scale) + 1)
    floor_scale=8192,       # NoPE-layer temperature: positions per step of the log (see attn_scale)
    context=256,            # tokens per training window (and the longest prompt + answer)
    # --- data: the text (README: Tokenizer and data) ---
    text_source="shapes",   # "shapes", "hf" (hf_dataset below), or local .txt/.jsonl/.parquet files, comma-separated
    data_dir="data/shapes",  # where tokenizer.json, train.bin, val.bin, meta.json live (prepared if missing)
    hf_dataset="HuggingFaceTB/smollm-corpus",  # the Hub dataset streamed when text_source="hf"
    hf_config="cosmopedia-v2",  # its subset ("" for none)
    text_column="text",     # the column (.jsonl: the field) that holds each document
    max_tokens=5_000_000,   # stop preparing text after this many training tokens
    shapes_docs=60_000,     # Shapes World training documents to generate
    doc_aligned=True,       # every attn_chunk of a training window starts at a document's first token, so that a
                            # RoPE layer sees short documents whole; false: nanoGPT's windows from anywhere
    # --- loop: the training loop (README: The training loop) ---
    batch_size=16,          # sequences per micro-batch (per process)
    grad_accum_steps=1,     # micro-batches per optimizer step
    max_iters=700,          # optimizer steps
    max_seconds=0.0,        # if > 0, also stop (and save) after this much training time
    lr=5e-4,                # peak learning rate; at 3e-3 the Shapes World model never learns to copy from its context
    min_lr=5e-5,            # cosine decay ends here
    warmup_iters=50,        # steps of linear learning-rate warm-up
    weight_decay=0.1,       # AdamW's, on matrices (weights, embeddings, experts); never on norms or biases
    beta1=0.9,              # AdamW: decay of the running mean of gradients
    beta2=0.95,             # AdamW: decay of the running mean of squared gradients
    grad_clip=1.0,          # clip the gradient's global norm to this; 0 = off
    aux_loss_coef=0.01,     # weight of the Switch load-balancing loss
    eval_interval=350,      # steps between evaluations (and checkpoints)
    eval_iters=20,          # batches per evaluation
    log_interval=50,        # steps between log lines
    dtype="auto",           # "auto" (bf16 on CUDA if supported, else fp16; fp32 on CPU), "float32", "bfloat16", "float16"
    compile=False,          # wrap the model in torch.compile
    device="auto",          # "auto", "cpu", "cuda", "cuda:1", ...
    seed=1337,              # seeds the weights, the data order and Shapes World
    out_root="out",         # where each phase writes by default (out_dir) and finds the phase before it
    out_dir="",             # the folder this script writes to; "" means <out_root>/<phase>
    resume=False,           # continue from <out_dir>/ckpt.pt
    # --- align: phase 2, vision-language alignment (README: Phase 2) ---
    llm_ckpt="",                # the phase-1 checkpoint whose LLM is frozen and extended; "" means <out_root>/pretrain/ckpt.pt
    vision_model="shapes_vit",  # "shapes_vit" (a small torchvision ViT for 48 px Shapes World) or "vit_b_16"
    vision_weights="shapes",    # "shapes" (train the stand-in, cached), "IMAGENET1K_V1", a .pth path, or "none"
    vision_layer=-1,            # -1: patch tokens after the final LayerNorm; -2: of the penultimate block, ...
    image_size=48,              # the encoder's input side; 48 px = 6 x 6 patches, 2 x 2 per grid cell (vit_b_16: 224)
    pixel_shuffle=1,            # 2: fold 2x2 neighbouring patch tokens into one (4x fewer image tokens); 1 = off
    projector_hidden=512,       # the MLP projector: Linear(vision_dim * shuffle^2, hidden) -> GELU -> Linear(hidden, dim)
    caption_source="shapes",    # "shapes", "hf" (caption_dataset), a folder with metadata.jsonl, or COCO-style .parquet
    caption_dataset="jxie/coco_captions",  # the Hub dataset read when caption_source="hf"
    caption_prompt="\ncaption:",  # text between the image and its caption; Shapes World's own cue to restate
    max_caption_tokens=64,      # longer captions are cut
    cache_features=True,        # encode each image once with the frozen encoder and reuse the features
    group_by_length=1,          # draw the rows of this many micro-batches at once and batch them by length, so that
                                # little of a batch is padding (align.batches_by_length); 1 = each drawn on its own
    train_images=12_000,        # Shapes World training scenes: phase 3's conversations, phase 2's captions (24,000 there)
    eval_images=200,            # held-out scenes whose generated captions are scored at each eval
    epochs=0,                   # if > 0, max_iters = epochs over the training captions
    encoder_steps=600,          # Shapes World: steps of the stand-in "ImageNet pretraining" of the encoder
    encoder_images=24_000,      # Shapes World: rendered training scenes it draws its steps' images from (8,000 before
                                # 2026-12-03: more shapes misread, and phase 2 needed 2,400 steps; docs/research.md)
    encoder_lr=2e-3,            # Shapes World: its peak learning rate
    # --- instruct: phase 3, visual instruction tuning (README: Phase 3) ---
    align_ckpt="",              # the phase-2 checkpoint to start from; "" means <out_root>/align/ckpt.pt
    instruct_source="shapes",   # "shapes" (Shapes World Q&A) or a LLaVA-format JSON file
    image_folder="",            # the images a LLaVA-format JSON names (e.g. COCO train2017)
    projector_lr_scale=1.0,     # the projector's learning rate as a multiple of lr (the LLM's)
    # --- dpo: phase 4, preference tuning with DPO (README: Phase 4) ---
    instruct_ckpt="",           # the phase-3 checkpoint: the policy to tune and its frozen reference; "" means
                                # <out_root>/instruct/ckpt.pt
    beta=0.1,                   # DPO's beta: the scale of the implicit reward; smaller lets the policy move further
    nll_coef=0.5,               # weight of the chosen responses' language-model loss added to DPO's: it keeps their
                                # probability from falling with the rejected ones' (Iterative RPO, Pang et al. 2024: 1;
                                # Llama 3: 0.2; here 0.5, docs/research.md: Phase 4)
    dpop_lambda=50.0,           # DPO-Positive (DPOP, Pal et al. 2024): penalise a chosen response whose log-prob falls
                                # below the reference's, inside DPO's sigmoid; 0 = plain DPO (docs/research.md: Phase 4)
    pref_source="shapes",       # "shapes" (pairs made from Shapes World), "hf" (pref_dataset), or local .parquet
                                # files (paths or glob patterns, comma-separated)
    pref_dataset="HuggingFaceH4/rlaif-v_formatted",  # the Hub dataset read when pref_source="hf"
    pref_scenes=1000,           # Shapes World: training scenes to make preference pairs from
    pref_samples=2,             # Shapes World: answers sampled (temperature 1) per prompt, besides the greedy one
    caption_corruptions=2,      # Shapes World: captions with one made-up detail per scene
    cut_rejected=1,             # 1: score a rejected response only up to its first token that differs from the chosen
                                # one (Shapes World's pairs differ in a word); 0: all of it, as DPO does (RLAIF-V)
    # --- sampling: sample.py and caption.py ---
    prompt="",              # sample.py: the text to continue; caption.py: a question about the image
    max_new_tokens=60,      # tokens to generate at most
    temperature=0.0,        # divides the logits before sampling; 0 means greedy
    top_k_sampling=0,       # sample among the k likeliest tokens only; 0 = off
    top_p=1.0,              # keep the smallest set of tokens whose probability reaches top_p; 1 = off
    ckpt="",                # the checkpoint to read; "" means <out_root>/pretrain (sample.py, export_hf.py),
                            # <out_root>/align (caption.py) or, with a --prompt, <out_root>/instruct
    image="",               # caption.py: the image to caption or ask about
    # --- bench: bench.py's own ---
    rows="training,moe,generation,phase2,cuda",  # which rows of the table to measure, comma-separated
    profile=False,          # after the cuda row, print a torch.profiler table of its largest batch
)

PRESETS = {
    # Shapes World on a laptop CPU: a few minutes per phase.
    "shapes": {},
    # The seed project's recipe (README: The full recipe): 223,795,968 parameters, 138,861,312 active per token.
    # Its own folders (out/seed/pretrain, out/seed/align, ...), so it never overwrites the quick start's.
    "llama4_seed": dict(
        out_root="out/seed",
        vocab_size=32_000, dim=768, n_layers=12, n_heads=12, n_kv_heads=4, head_dim=64, ffn_hidden=2048,
        moe_hidden=1024,
        attn_chunk=512, context=1024, text_source="hf", data_dir="data/cosmopedia", max_tokens=200_000_000,
        doc_aligned=False,  # Cosmopedia's documents are about as long as a chunk or longer: aligned windows
                            # would rarely train past a document's first 512 tokens
        batch_size=7, max_iters=20_000, lr=3e-4, min_lr=3e-5, warmup_iters=1000, eval_interval=1000,
        eval_iters=50, log_interval=100, dtype="auto",
        align=dict(vision_model="vit_b_16", vision_weights="IMAGENET1K_V1", image_size=224, pixel_shuffle=1,
                   caption_prompt="", projector_hidden=3072, caption_source="hf", batch_size=48, group_by_length=1,
                   lr=2e-4, min_lr=2e-5, epochs=3, warmup_iters=200, eval_interval=2000, eval_iters=50,
                   log_interval=100),
        instruct=dict(instruct_source="data/llava/llava_instruct_150k.json", image_folder="data/coco/train2017",
                      batch_size=16, grad_accum_steps=1, group_by_length=1, lr=2e-5, min_lr=2e-6,
                      projector_lr_scale=10.0, epochs=1, warmup_iters=200, eval_interval=2000, eval_iters=50,
                      log_interval=100),
        # DPO's own recipe (Rafailov et al. 2023, appendix B): beta 0.1, 64 pairs a step, lr 1e-6 reached after
        # 150 warm-up steps; Zephyr (Tunstall et al. 2023) used 5e-7. One epoch of RLAIF-V's 78,975 pairs.
        dpo=dict(pref_source="hf", batch_size=8, grad_accum_steps=8, lr=1e-6, min_lr=1e-7, warmup_iters=150,
                 epochs=1, beta=0.1, dpop_lambda=0.0, cut_rejected=0, eval_interval=200, eval_iters=50,
                 log_interval=20),
    ),
}


# The sections (the "# --- name: ..." lines in CONFIG) and single keys that each script reads: its --help lists
# them. Every script accepts every key (a preset sets keys of all phases); the others are simply not used.
READS = {
    "pretrain": ("model", "data", "loop"),
    "prepare": ("data", "vocab_size", "seed"),
    "align": ("loop", "align"),
    "instruct": ("loop", "cache_features", "group_by_length", "train_images", "eval_images", "instruct"),
    "dpo": ("loop", "eval_images", "projector_lr_scale", "dpo"),
    "sample": ("sampling", "device", "seed", "out_root"),
    "caption": ("image", "sampling", "device", "out_root"),
    "export": ("ckpt", "out_dir", "out_root"),
    "bench": ("model", "loop", "align", "bench"),
    "shapes_world": ("out_dir",),
}

# Scripts that take plain arguments, and the config keys they fill in order
# (python caption.py IMAGE, python export_hf.py CKPT OUT_DIR).
POSITIONAL = {"caption": ("image",), "export": ("ckpt", "out_dir"), "shapes_world": ("out_dir",)}

# Each phase's own defaults, applied over CONFIG and under the presets.
PHASE_DEFAULTS = {
    # 1,800 steps of 32 captions of 24,000 scenes (2,400 of 12,000 before, on an encoder of 8,000): the same
    # captions, and align fits its 6 minutes on 2 CPU cores (docs/research.md, "Align in 1,800 steps").
    "align": dict(lr=3e-3, min_lr=3e-4, batch_size=32, max_iters=1800, warmup_iters=30, eval_interval=600,
                  log_interval=100, eval_iters=10, group_by_length=16, train_images=24_000),
    # A step of 32 conversations, run as two micro-batches of 16 of similar length (group_by_length). 700 steps:
    # 266-283 s on 2 AMD EPYC cores in slow hours (301-331 s before the last block ran at the targets alone); in
    # 600 seed 1 answered 91.8 %, below its 93 % (docs/research.md, "Phase 3 in 700 steps").
    "instruct": dict(lr=1e-3, min_lr=1e-4, batch_size=16, grad_accum_steps=2, group_by_length=2, max_iters=700,
                     warmup_iters=30, eval_interval=350, log_interval=100, eval_iters=20, eval_images=100,
                     projector_lr_scale=4.0),
    # eval_iters x batch_size = 1,280 held-out pairs at most: every one of Shapes World's (about 1,000).
    # Evaluated at steps 0 and 400 only: an evaluation costs 7 to 11 s on 2 CPU cores, and the run is the same.
    # 400 steps with cut_rejected: on 3,764 pairs of 500 unseen scenes 95.6 % ranked right (300 steps: 93.6) and
    # 3 of 2,000 unseen captions named an absent shape (7; docs/research.md, "Phase 4: rejected responses cut").
    # lr 2e-4: on 2,000 unseen scenes, position answers gained 2.3 points over phase 3's (1.5 at 1e-4) and
    # captions 1.8 (with 1b2a6ec's binding questions; docs/research.md, "Phase 4: the questions phase 3 gets
    # wrong"); 3e-4 ranked fewer unseen pairs right (93.5 against 94.8 %; "Phase 4: a 'no' that costs every 'yes'").
    "dpo": dict(lr=2e-4, min_lr=2e-5, batch_size=32, max_iters=400, warmup_iters=20, eval_interval=400,
                log_interval=20, eval_iters=40),
    "export": dict(out_dir="out/hf"),
    "shapes_world": dict(out_dir="out/shapes_samples"),
}


class UserError(Exception):
    """A failure the user can fix: a bad setting, missing data, an unusable checkpoint. run() prints it as one
    `error: ...` line instead of a traceback. ConfigError, DataError, TrainingError and ExportError are kinds."""


class ConfigError(UserError, ValueError):
    """A bad preset, key or value on the command line."""


# Keys whose value must be one of a few names.
CHOICES = {"dtype": ("auto", "float32", "bfloat16", "float16")}


def _parse_value(key, text, default):
    """Convert a command-line string to the type of the key's default."""
    if isinstance(default, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"--{key} expects true or false, got {text!r}")
    if isinstance(default, int):
        try:
            return int(text.replace("_", ""))
        except ValueError:
            raise ConfigError(f"--{key} expects an integer, got {text!r}") from None
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"--{key} expects a number, got {text!r}") from None
    if key in CHOICES and text not in CHOICES[key]:
        raise ConfigError(f"--{key} expects one of {', '.join(CHOICES[key])}, got {text!r}")
    return text


POSITIVE = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "moe_hidden", "n_experts", "top_k",
            "moe_every", "nope_every", "context", "batch_size", "grad_accum_steps", "eval_interval", "eval_iters",
            "log_interval", "pixel_shuffle", "image_size", "group_by_length")


def check(config):
    """Values that would otherwise fail deep inside a run, as one ConfigError now."""
    for key in POSITIVE:
        if config[key] < 1:
            raise ConfigError(f"--{key} must be at least 1, got {config[key]}")
    head_dim = config["head_dim"] or config["dim"] // config["n_heads"]
    if config["n_heads"] % config["n_kv_heads"]:
        raise ConfigError(f"--n_heads={config['n_heads']} must be a multiple of --n_kv_heads={config['n_kv_heads']}")
    if not config["head_dim"] and config["dim"] % config["n_heads"]:
        raise ConfigError(f"--dim={config['dim']} must be a multiple of --n_heads={config['n_heads']} "
                          f"(or set --head_dim)")
    if head_dim % 2:
        raise ConfigError(f"the head width {head_dim} must be even: RoPE rotates pairs of dimensions")
    if config["top_k"] > config["n_experts"]:
        raise ConfigError(f"--top_k={config['top_k']} is more than --n_experts={config['n_experts']}")
    if config["temperature"] < 0 or config["top_k_sampling"] < 0 or not 0 < config["top_p"] <= 1:
        raise ConfigError("sampling needs --temperature >= 0, --top_k_sampling >= 0 and 0 < --top_p <= 1")
    if config["max_new_tokens"] < 0:
        raise ConfigError(f"--max_new_tokens must be 0 or more, got {config['max_new_tokens']}")


def config_table():
    """[(section, key, meaning)] for every CONFIG key, read from this file's own text: the "# --- name: ..."
    lines are the sections (their whole text) and the comment after a key, with any comment-only lines below
    it, is its meaning. --help prints them, so the help cannot drift from the defaults."""
    import io
    import tokenize
    with open(__file__, encoding="utf-8") as f:
        source = f.read()
    start = source.index("\nCONFIG = dict(") + 1
    table, section, depth, previous = [], "", 0, None
    for token in tokenize.generate_tokens(io.StringIO(source[start:]).readline):
        if token.type == tokenize.OP and token.string in "([{":
            depth += 1
        elif token.type == tokenize.OP and token.string in ")]}":
            depth -= 1
            if depth == 0:
                return [(section, key, " ".join(meaning)) for section, key, meaning in table]
        elif token.type == tokenize.NAME and depth == 1 and token.string in CONFIG and previous != "=":
            table.append((section, token.string, []))
        elif token.type == tokenize.COMMENT:
            text = token.string.lstrip("#").strip()
            if text.startswith("---"):
                section = text.strip("- ")
            elif table:
                table[-1][2].append(text)
        if token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT):
            previous = token.string
    raise AssertionError("CONFIG's closing parenthesis not found")


def help_text(phase, config):
    """The script's docstring, then each key it reads (READS) with its value for this phase and preset and
    its meaning, grouped by section."""
    main_doc = (getattr(sys.modules.get("__main__"), "__doc__", None) or "").strip()
    reads = READS.get(phase, ())
    rows = [(section, f"--{key}={config[key] if config[key] != '' else chr(34) * 2}", meaning)
            for section, key, meaning in config_table() if section.split(":")[0] in reads or key in reads]
    lines = [main_doc, "", f"Options (--key=value or --key value), with the values of --preset={config['preset']} "
                           f"(presets: {', '.join(PRESETS)}):"]
    shown_section = None
    for section, option, meaning in rows:
        if section != shown_section:
            lines += ["", f"# {section}"]
            shown_section = section
        if len(option) > 30:  # a long value: its meaning goes on the next line
            lines += [f"  {option}", f"  {'':30}  {meaning}"]
        else:
            lines.append(f"  {option:<30}  {meaning}")
    return "\n".join(lines)


def get_config(phase, argv=None):
    """The config dict for `phase` ("pretrain", "align", ...) from the command line `argv`. With --help (or
    -h) anywhere, prints the script's options and exits."""
    argv = sys.argv[1:] if argv is None else argv
    config = dict(CONFIG, **PHASE_DEFAULTS.get(phase, {}))
    overrides = {}
    preset = "shapes"
    positional = list(POSITIONAL.get(phase, ()))
    args = [arg for arg in argv if arg not in ("--help", "-h")]
    wants_help = len(args) < len(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--") and positional:
            overrides[positional.pop(0)] = arg  # e.g. the image in "python caption.py img.png"
            continue
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"expected --key=value, got {arg!r}")
        key, has_value, text = arg[2:].partition("=")
        if not has_value:  # "--key value", or a bare "--flag" meaning true
            if isinstance(config.get(key), bool) and (not args or args[0].startswith("--")):
                text = "true"
            elif args:
                text = args.pop(0)
            else:
                raise ConfigError(f"--{key} needs a value")
        if key == "preset":
            preset = text
        elif key not in config:
            raise ConfigError(f"unknown config key --{key} (--help lists this script's keys; config.py has all)")
        else:
            overrides[key] = _parse_value(key, text, config[key])
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    phase_presets = {k: v for k, v in PRESETS[preset].items() if not isinstance(v, dict)}
    config.update(phase_presets)
    config.update(PRESETS[preset].get(phase, {}))
    config.update(overrides)
    check(config)
    config["preset"], config["phase"] = preset, phase  # the phase is written into its checkpoints
    # Where a phase writes, and where the next phase finds it: all under out_root unless named.
    config["out_dir"] = config["out_dir"] or f"{config['out_root']}/{phase}"
    config["llm_ckpt"] = config["llm_ckpt"] or f"{config['out_root']}/pretrain/ckpt.pt"
    config["align_ckpt"] = config["align_ckpt"] or f"{config['out_root']}/align/ckpt.pt"
    config["instruct_ckpt"] = config["instruct_ckpt"] or f"{config['out_root']}/instruct/ckpt.pt"
    if wants_help:
        print(help_text(phase, config))
        sys.exit(0)
    return config


def run(main):
    """Run a script's main: a UserError (bad config, data, checkpoint or loss) ends as one `error: ...` line
    and exit status 1 instead of a traceback; a DDP process group is always closed."""
    try:
        main()
    except UserError as error:
        sys.exit(f"error: {error}")
    finally:
        torch = sys.modules.get("torch")
        if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
