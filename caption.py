"""Caption an image with a phase-2 checkpoint, or answer a question about it with a phase-3 checkpoint.

    python caption.py photo.jpg                                        # out/align/ckpt.pt, greedy
    python caption.py photo.jpg --temperature=0.7 --top_k_sampling=20  # sampled
    python caption.py photo.jpg --prompt "How many shapes are there?"  # out/instruct/ckpt.pt

Any image Pillow opens works: RGB, grey, RGBA, palette, CMYK, 16-bit, any size (it is resized).
"""
import torch

from align import caption_images, caption_prompt, image_transform, open_image, vlm_from_checkpoint
from config import ConfigError, get_config, run
from data.prepare_text import SPECIAL_TOKENS
from pretrain import setup_device


def main(argv=None):
    config = get_config("caption", argv)
    if not config["image"]:
        raise ConfigError('name an image: python caption.py IMAGE [--prompt "a question"]')
    _, _, device = setup_device(config)
    question = config["prompt"].strip()
    if any(token in question for token in SPECIAL_TOKENS):
        raise ConfigError("the prompt contains a special token (<|...|>); ask in plain text")
    phase = "instruct" if question else "align"  # a question needs phase 3's chat; a caption, phase 2
    path = config["ckpt"] or f"{config['out_root']}/{phase}/ckpt.pt"
    vlm, tokenizer, state = vlm_from_checkpoint(path, f"python {phase}.py", device)
    if not question and state.get("phase") in ("instruct", "dpo"):
        # A chat model has been trained on turns since phase 2 and no longer captions in phase 2's form
        # (exact captions fall to ~0 %); it is asked for its caption in a turn, as phase 3 taught it.
        from instruct import CAPTION_REQUEST
        question = CAPTION_REQUEST
    image = open_image(config["image"])
    with torch.no_grad():
        features = vlm.image_features(image_transform(state["config"])(image)[None].to(device))
    sampling = dict(temperature=config["temperature"], top_k=config["top_k_sampling"], top_p=config["top_p"])
    if question:
        from instruct import question_prefix
        before, after = question_prefix(tokenizer, question)
        ids = caption_images(vlm, features, config["max_new_tokens"], before, after, **sampling)[0]
    else:
        after = caption_prompt(tokenizer, state["config"])  # the prompt it was trained with
        ids = caption_images(vlm, features, config["max_new_tokens"], after=after, **sampling)[0]
    print(tokenizer.decode(ids).strip())


if __name__ == "__main__":
    run(main)
