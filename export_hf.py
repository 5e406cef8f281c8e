"""Export a phase-1 checkpoint to the Hugging Face transformers format, as a `Llama4ForCausalLM`.

    python export_hf.py out/pretrain/ckpt.pt out/hf        # or --ckpt=... --out_dir=...; these two are the defaults

Then, with `pip install -r requirements-test.txt` (transformers is only needed to *use* the export):

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("out/hf")           # Llama4ForCausalLM
    tokenizer = AutoTokenizer.from_pretrained("out/hf")
    ids = tokenizer("a red", return_tensors="pt").input_ids           # <|begin_of_text|> a red, as sample.py
    print(tokenizer.decode(model.generate(ids, max_new_tokens=40)[0], skip_special_tokens=True))

Our model follows the semantics of transformers' Llama4TextModel exactly, so exporting is only
renaming: the weights keep their values and their orientation, and the one change of layout is that
transformers stores each expert's gate and up projections side by side in one tensor. The exported folder:

    config.json              a Llama4TextConfig ("model_type": "llama4_text") holding our sizes
    generation_config.json   the begin / end / pad ids; generation stops at <|end_of_text|> and <|eot|>
    model.safetensors        every weight under its transformers name
    tokenizer.json           our byte-level BPE tokenizer, which also prepends <|begin_of_text|> by default
    tokenizer_config.json    loads it as a PreTrainedTokenizerFast with bos, eos and pad set

Nothing here imports transformers: config.json and the tokenizer files are plain JSON, and the weights are
written with `safetensors`. The optimizer state and everything else in the checkpoint are left behind.
"""
import json
import os
import shutil

import torch

from config import UserError, get_config, run
from data.prepare_text import BOS_ID, EOS_ID, EOT_ID, PAD_ID, SPECIAL_TOKENS
from pretrain import head_dim_of, model_from_checkpoint


class ExportError(UserError, RuntimeError):
    """An export that cannot be written (a bad output folder, a missing package); the message says what to do."""


# ----------------------------------------------------------------------------------------------------------
# The config: our config keys -> Llama4TextConfig fields
# ----------------------------------------------------------------------------------------------------------

def hf_config(config, dtype):
    """config.json for `Llama4ForCausalLM`. transformers counts layers from 0, as we do: layer i is MoE when
    (i + 1) % moe_every == 0 and NoPE when (i + 1) % nope_every == 0. The layer lists are written out in
    full so that no default of transformers (a MoE on every layer, NoPE every 4th) decides for us."""
    layers = range(config["n_layers"])
    use_rope = [int((i + 1) % config["nope_every"] != 0) for i in layers]  # 1: RoPE layer, 0: NoPE layer
    chunk = config["attn_chunk"] or None                                   # 0 means no chunking
    return {
        "architectures": ["Llama4ForCausalLM"],
        "model_type": "llama4_text",
        "dtype": str(dtype).removeprefix("torch."),
        "vocab_size": config["vocab_size"],
        "hidden_size": config["dim"],
        "num_hidden_layers": config["n_layers"],
        "num_attention_heads": config["n_heads"],
        "num_key_value_heads": config["n_kv_heads"],
        "head_dim": head_dim_of(config),
        "max_position_embeddings": config["context"],
        "rms_norm_eps": config["norm_eps"],
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": False,                    # our LM head is its own matrix
        # Feed-forward: dense SwiGLU layers and the MoE layers' experts (routed and shared) have their own sizes.
        "intermediate_size_mlp": config["ffn_hidden"],
        "intermediate_size": config["moe_hidden"],
        "num_local_experts": config["n_experts"],
        "num_experts_per_tok": config["top_k"],
        "interleave_moe_layer_step": config["moe_every"],
        "moe_layers": [i for i in layers if (i + 1) % config["moe_every"] == 0],
        # Attention: iRoPE. RoPE layers rotate, L2-normalise q and k, and attend within chunks; NoPE layers
        # attend globally with the temperature 1 + attn_scale * log(floor((pos + 1) / floor_scale) + 1) on q.
        "rope_parameters": {"rope_type": "default", "rope_theta": config["rope_theta"]},
        "rope_theta": config["rope_theta"],              # where transformers 4.x looks for it
        "no_rope_layer_interval": config["nope_every"],
        "no_rope_layers": use_rope,                      # despite its name, 1 marks a layer that *uses* RoPE
        "attention_chunk_size": chunk,
        "layer_types": ["chunked_attention" if rope and chunk else "full_attention" for rope in use_rope],
        "use_qk_norm": True,
        "attn_temperature_tuning": True,
        "attn_scale": config["attn_scale"],
        "floor_scale": config["floor_scale"],
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
    }


# ----------------------------------------------------------------------------------------------------------
# The weights: our parameter names -> transformers' names
# ----------------------------------------------------------------------------------------------------------
#
#   ours (pretrain.Transformer)               transformers (Llama4ForCausalLM)
#   embed_tokens.weight                       model.embed_tokens.weight
#   layers.{i}.attn_norm.weight               model.layers.{i}.input_layernorm.weight
#   layers.{i}.attn.{q,k,v,o}_proj.weight     model.layers.{i}.self_attn.{q,k,v,o}_proj.weight
#   layers.{i}.ffn_norm.weight                model.layers.{i}.post_attention_layernorm.weight
#   dense layer:
#   layers.{i}.ffn.{gate,up,down}_proj.weight model.layers.{i}.feed_forward.{gate,up,down}_proj.weight
#   MoE layer:
#   layers.{i}.ffn.router.weight              model.layers.{i}.feed_forward.router.weight
#   layers.{i}.ffn.experts.gate_proj  (E, dim, hidden)  \
#   layers.{i}.ffn.experts.up_proj    (E, dim, hidden)  /  model.layers.{i}.feed_forward.experts.gate_up_proj
#                                                            (E, dim, 2 * hidden): gate first, then up
#   layers.{i}.ffn.experts.down_proj  (E, hidden, dim)     model.layers.{i}.feed_forward.experts.down_proj
#   layers.{i}.ffn.shared_expert.{gate,up,down}_proj.weight
#                                             model.layers.{i}.feed_forward.shared_expert.{gate,up,down}_proj.weight
#   norm.weight                               model.norm.weight
#   lm_head.weight                            lm_head.weight
#
# q and k need no permutation: both sides rotate *interleaved* pairs (dims 2i, 2i+1) with RoPE (transformers
# views them as complex numbers, as Meta's code does). The experts keep our (in, out) orientation: transformers
# also computes them as x @ W with a batched matmul.

RENAMES = [  # (our name's piece, transformers' piece), applied in order
    ("layers.", "model.layers."),
    (".attn_norm.", ".input_layernorm."),
    (".attn.", ".self_attn."),
    (".ffn_norm.", ".post_attention_layernorm."),
    (".ffn.", ".feed_forward."),
]


def hf_name(name):
    """Our parameter name -> transformers' name (see the table above)."""
    if name in ("embed_tokens.weight", "norm.weight"):
        return "model." + name
    for ours, theirs in RENAMES:
        name = name.replace(ours, theirs, 1)
    return name


def hf_state_dict(state_dict):
    """Our state dict -> transformers' tensors: renamed, experts' gate and up fused into one tensor."""
    tensors = {}
    for name, tensor in state_dict.items():
        if name.endswith(".experts.up_proj"):
            continue  # fused with gate_proj below
        if name.endswith(".experts.gate_proj"):
            up = state_dict[name.removesuffix("gate_proj") + "up_proj"]
            tensor = torch.cat([tensor, up], dim=-1)                   # (E, dim, 2 * hidden)
            name = name.removesuffix("gate_proj") + "gate_up_proj"
        tensors[hf_name(name)] = tensor.detach().cpu().contiguous()
    return tensors


# ----------------------------------------------------------------------------------------------------------
# The tokenizer: our tokenizers JSON, wrapped for AutoTokenizer
# ----------------------------------------------------------------------------------------------------------

def hf_tokenizer_files(tokenizer, context):
    """(tokenizer.json, tokenizer_config.json) as dicts. The BPE model is ours unchanged, so
    tokenizer(text, add_special_tokens=False) gives exactly pretrain.encode(tokenizer, text); by default a
    transformers tokenizer adds special tokens, and ours then prepends <|begin_of_text|> - what every training
    document starts with and what sample.py puts before a prompt."""
    bos = SPECIAL_TOKENS[BOS_ID]
    tokenizer_json = json.loads(tokenizer.to_str())
    tokenizer_json["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [BOS_ID], "tokens": [bos]}},
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": SPECIAL_TOKENS[EOS_ID],
        "pad_token": SPECIAL_TOKENS[PAD_ID],
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,   # decode must give back the text exactly, spaces included
        "model_max_length": context,
    }
    return tokenizer_json, tokenizer_config


# ----------------------------------------------------------------------------------------------------------
# Writing the folder
# ----------------------------------------------------------------------------------------------------------

def check_output(out_dir):
    """The output must be a new or empty folder; refuse anything else before reading the checkpoint."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ExportError(f"{out_dir} is a file, not a folder; pass a new folder, e.g. out/hf")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ExportError(f"{out_dir} is not empty; pass a new or empty folder (or delete it first)")
    ancestor = os.path.dirname(os.path.abspath(out_dir))  # the nearest existing folder above out_dir
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor) or not os.access(ancestor, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write to {out_dir} ({ancestor} is not a writable folder); pass another path")


def write_json(path, data):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")


def export(ckpt_path, out_dir):
    """Write the transformers folder for the checkpoint at ckpt_path. Everything is written into a temporary
    folder beside out_dir and moved into place at the end, so a failed export leaves nothing behind."""
    check_output(out_dir)
    model, tokenizer, state = model_from_checkpoint(ckpt_path)  # checks the weights fit the config
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ExportError("exporting needs the safetensors package: pip install -r requirements-test.txt "
                          "(safetensors, and transformers to load the export)") from None
    config, weights = model.config, model.state_dict()
    tokenizer_json, tokenizer_config = hf_tokenizer_files(tokenizer, config["context"])
    tmp = f"{os.path.abspath(out_dir)}.tmp-{os.getpid()}"
    try:
        os.makedirs(tmp)
        write_json(os.path.join(tmp, "config.json"), hf_config(config, model.lm_head.weight.dtype))
        write_json(os.path.join(tmp, "generation_config.json"),
                   dict(bos_token_id=BOS_ID, eos_token_id=[EOS_ID, EOT_ID], pad_token_id=PAD_ID))
        save_file(hf_state_dict(weights), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        write_json(os.path.join(tmp, "tokenizer.json"), tokenizer_json)
        write_json(os.path.join(tmp, "tokenizer_config.json"), tokenizer_config)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty, as check_output made sure
        os.replace(tmp, out_dir)
    except OSError as error:
        raise ExportError(f"cannot write {out_dir}: {error.strerror or error}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total = sum(t.numel() for t in weights.values())
    return f"wrote {out_dir}: Llama4ForCausalLM with {total:,} parameters, step {state.get('step', '?')}"


def main(argv=None):
    config = get_config("export", argv)  # python export_hf.py [CKPT [OUT_DIR]]: the keys ckpt and out_dir
    print(export(config["ckpt"] or f"{config['out_root']}/pretrain/ckpt.pt", config["out_dir"]))


if __name__ == "__main__":
    run(main)
