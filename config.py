"""One plain-Python config for every phase, with named presets and --key=value overrides.

    python pretrain.py                                   # the default preset: Shapes World on a CPU
    python pretrain.py --preset=llama4_seed              # the seed's full recipe
    python pretrain.py --max_iters=200 --batch_size=8    # any entry can be overridden (--key value works too)

Resolution order: CONFIG < PHASE_DEFAULTS[phase] < PRESETS[preset] < PRESETS[preset][phase] < command line.
Every value on the command line is checked against the type of its default.
"""
import sys

CONFIG = dict(
    # --- the language model (README: How the model works; these defaults are the tiny Shapes World model) ---
    vocab_size=512,         # tokenizer and embedding size; special tokens sit at fixed ids 0..6
    dim=128,                # width of the residual stream
    n_layers=4,
    n_heads=4,              # query heads
    n_kv_heads=2,           # key/value heads shared by groups of query heads (GQA)
    head_dim=0,             # width of each head; 0 means dim // n_heads
    ffn_hidden=256,         # hidden size of the dense SwiGLU layers
    moe_hidden=128,         # hidden size of each routed expert and of the shared expert
    n_experts=8,            # routed experts per MoE layer
    top_k=2,                # experts each token is sent to
    moe_every=2,            # layers 1, 3, 5, ... are MoE (Llama 4's interleave_moe_layer_step)
    nope_every=4,           # layers 3, 7, 11, ... have no RoPE and attend globally (iRoPE)
    rope_theta=10000.0,
    attn_chunk=128,         # RoPE layers attend only within chunks of this many positions
    norm_eps=1e-5,
    attn_scale=0.1,         # NoPE-layer query temperature: 1 + attn_scale * log(floor((pos+1)/floor_scale) + 1)
    floor_scale=8192,
    context=256,            # tokens per training window (and the longest prompt + answer)
    # --- text data (README: Tokenizer and data) ---
    text_source="shapes",   # "shapes", "hf" (hf_dataset below), or local .txt/.jsonl/.parquet files, comma-separated
    data_dir="data/shapes",  # where tokenizer.json, train.bin, val.bin, meta.json live (prepared if missing)
    hf_dataset="HuggingFaceTB/smollm-corpus",
    hf_config="cosmopedia-v2",
    text_column="text",
    max_tokens=5_000_000,   # stop preparing text after this many training tokens
    shapes_docs=60_000,     # Shapes World training documents to generate
    # --- the training loop (README: The training loop) ---
    batch_size=16,          # sequences per micro-batch (per process)
    grad_accum_steps=1,     # micro-batches per optimizer step
    max_iters=1000,         # optimizer steps
    max_seconds=0.0,        # if > 0, also stop (and save) after this much training time
    lr=5e-4,                # peak; at 3e-3 the Shapes World model never learns to copy from its context
    min_lr=5e-5,            # cosine decay ends here
    warmup_iters=50,
    weight_decay=0.1,
    beta1=0.9,
    beta2=0.95,
    grad_clip=1.0,
    aux_loss_coef=0.01,     # weight of the Switch load-balancing loss
    eval_interval=250,
    eval_iters=20,          # batches per evaluation
    log_interval=50,
    dtype="auto",           # "auto" (bf16 on CUDA if supported, else fp16; fp32 on CPU), "float32", "bfloat16", "float16"
    compile=False,          # wrap the model in torch.compile
    device="auto",          # "auto", "cpu", "cuda", "cuda:1", ...
    seed=1337,
    out_dir="",             # "" means out/<phase>
    resume=False,           # continue from <out_dir>/ckpt.pt
    # --- phase 2: vision-language alignment (README: Phase 2) ---
    llm_ckpt="out/pretrain/ckpt.pt",  # the phase-1 checkpoint whose LLM is frozen and extended
    vision_model="shapes_vit",  # "shapes_vit" (a small torchvision ViT for 64 px Shapes World) or "vit_b_16"
    vision_weights="shapes",    # "shapes" (train the stand-in, cached), "IMAGENET1K_V1", a .pth path, or "none"
    vision_layer=-1,            # -1: patch tokens after the final LayerNorm; -2: of the penultimate block, ...
    image_size=64,              # the encoder's input side (vit_b_16: resize 256, centre-crop 224)
    pixel_shuffle=2,            # fold 2x2 neighbouring patch tokens into one (4x fewer image tokens); 1 = off
    projector_hidden=512,       # the MLP projector: Linear(vision_dim * shuffle^2, hidden) -> GELU -> Linear(hidden, dim)
    caption_source="shapes",    # "shapes", "hf" (caption_dataset), a folder with metadata.jsonl, or COCO-style .parquet
    caption_dataset="jxie/coco_captions",
    max_caption_tokens=64,      # longer captions are cut
    cache_features=True,        # encode each image once with the frozen encoder and reuse the features
    train_images=12_000,        # Shapes World scenes for caption training
    eval_images=200,            # held-out scenes whose generated captions are scored at each eval
    epochs=0,                   # if > 0, max_iters = epochs over the training captions
    encoder_steps=600,          # Shapes World: steps of the stand-in "ImageNet pretraining" of the encoder
    encoder_lr=2e-3,
    # --- phase 3: visual instruction tuning (README: Phase 3) ---
    align_ckpt="out/align/ckpt.pt",   # the phase-2 checkpoint to start from
    instruct_source="shapes",   # "shapes" (Shapes World Q&A) or a LLaVA-format JSON file
    image_folder="",            # the images a LLaVA-format JSON names (e.g. COCO train2017)
    projector_lr_scale=1.0,     # the projector's learning rate as a multiple of lr (the LLM's)
    # --- sampling (sample.py, caption.py) ---
    prompt="",
    max_new_tokens=60,
    temperature=0.0,        # 0 means greedy
    top_k_sampling=0,       # 0 means no top-k filtering
    top_p=1.0,
    ckpt="",                # "" means the phase's usual checkpoint (out/pretrain, out/align or out/instruct)
    image="",               # caption.py: the image to caption or ask about
)

PRESETS = {
    # Shapes World on a laptop CPU: a few minutes per phase.
    "shapes": {},
    # The seed project's recipe (README: The full recipe): 223,795,968 parameters, 138,861,312 active per token.
    "llama4_seed": dict(
        vocab_size=32_000, dim=768, n_layers=12, n_heads=12, n_kv_heads=4, ffn_hidden=2048, moe_hidden=1024,
        attn_chunk=512, context=1024, text_source="hf", data_dir="data/cosmopedia", max_tokens=200_000_000,
        batch_size=7, max_iters=20_000, lr=3e-4, min_lr=3e-5, warmup_iters=1000, eval_interval=1000,
        eval_iters=50, log_interval=100, dtype="auto",
        align=dict(vision_model="vit_b_16", vision_weights="IMAGENET1K_V1", image_size=224, pixel_shuffle=1,
                   projector_hidden=3072, caption_source="hf", batch_size=48, lr=2e-4, min_lr=2e-5, epochs=3,
                   warmup_iters=200, eval_interval=2000, eval_iters=50, log_interval=100),
        instruct=dict(instruct_source="data/llava/llava_instruct_150k.json", image_folder="data/coco/train2017",
                      batch_size=16, lr=2e-5, min_lr=2e-6, projector_lr_scale=10.0, epochs=1, warmup_iters=200,
                      eval_interval=2000, eval_iters=50, log_interval=100),
    ),
}


# Scripts that take one plain argument, and the config key it fills.
POSITIONAL = {"caption": "image"}

# Each phase's own defaults, applied over CONFIG and under the presets.
PHASE_DEFAULTS = {
    "align": dict(lr=3e-3, min_lr=3e-4, batch_size=32, max_iters=1200, warmup_iters=30, eval_interval=400,
                  log_interval=100, eval_iters=10),
    "instruct": dict(lr=1e-3, min_lr=1e-4, batch_size=32, max_iters=1200, warmup_iters=30, eval_interval=400,
                     log_interval=100, eval_iters=10, eval_images=100, projector_lr_scale=4.0),
}


class ConfigError(ValueError):
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
            "log_interval", "pixel_shuffle", "image_size")


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


def get_config(phase, argv=None):
    """The config dict for `phase` ("pretrain", "align", ...) from the command line `argv`."""
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        main_doc = getattr(sys.modules.get("__main__"), "__doc__", None) or ""
        print(f"{main_doc.strip()}\n\nEvery key of config.py's CONFIG is an option: --key=value.")
        sys.exit(0)
    config = dict(CONFIG, **PHASE_DEFAULTS.get(phase, {}))
    overrides = {}
    preset = "shapes"
    args = list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--") and phase in POSITIONAL and not config[POSITIONAL[phase]]:
            config[POSITIONAL[phase]] = arg  # e.g. the image in "python caption.py img.png"
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
            raise ConfigError(f"unknown config key --{key} (see config.py for the list)")
        else:
            overrides[key] = _parse_value(key, text, config[key])
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    phase_presets = {k: v for k, v in PRESETS[preset].items() if not isinstance(v, dict)}
    config.update(phase_presets)
    config.update(PRESETS[preset].get(phase, {}))
    config.update(overrides)
    check(config)
    config["preset"] = preset
    config["out_dir"] = config["out_dir"] or f"out/{phase}"
    return config
