"""Generate text from a phase-1 checkpoint, with the KV cache.

    python sample.py --prompt "a red"
    python sample.py --prompt "the picture shows" --temperature=0.8 --top_k_sampling=50 --max_new_tokens=100
"""
import torch

from config import ConfigError, get_config, run
from data.prepare_text import BOS_ID, SPECIAL_TOKENS
from pretrain import encode, generate, model_from_checkpoint, setup_device


def complete(model, tokenizer, prompt, config, generator=None):
    """The prompt's continuation as text. Raises ConfigError for a prompt the model cannot take."""
    if not prompt.strip():
        raise ConfigError('the prompt is empty; pass one, e.g. --prompt="a red"')
    if any(token in prompt for token in SPECIAL_TOKENS):
        raise ConfigError("the prompt contains a special token (<|...|>); write plain text")
    ids = [BOS_ID] + encode(tokenizer, prompt)
    context = model.config["context"]
    if len(ids) >= context:
        raise ConfigError(f"the prompt is {len(ids)} tokens (with <|begin_of_text|>) but the model's context is "
                         f"{context}; shorten it")
    device = model.lm_head.weight.device
    new_ids = generate(model, torch.tensor([ids], device=device), config["max_new_tokens"],
                       config["temperature"], config["top_k_sampling"], config["top_p"], generator=generator)
    return tokenizer.decode(new_ids[0].tolist(), skip_special_tokens=True)


def main(argv=None):
    config = get_config("sample", argv)
    _, _, device = setup_device(config)
    path = config["ckpt"] or f"{config['out_root']}/pretrain/ckpt.pt"
    model, tokenizer, _ = model_from_checkpoint(path, device=device)
    generator = torch.Generator(device=device).manual_seed(config["seed"])
    print(config["prompt"] + complete(model, tokenizer, config["prompt"], config, generator))


if __name__ == "__main__":
    run(main)
