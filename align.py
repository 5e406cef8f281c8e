"""Phase 2: vision-language alignment. Teach the frozen phase-1 LLM to read images.

    python align.py                           # Shapes World on the CPU, a few minutes
    python align.py --preset=llama4_seed      # ViT-B/16 (ImageNet weights) + COCO captions, bf16 on CUDA
    python align.py --caption_source=my_images/   # a folder of images with metadata.jsonl

    image ─► frozen vision transformer ─► patch tokens (B, patches, vision_dim)
          ─► pixel shuffle (optional) ─► trainable MLP projector ─► image tokens (B, n_image_tokens, dim)
    text  "<|begin_of_text|> <|image|> x n_image_tokens  a red circle ... <|end_of_text|>"
          the <|image|> placeholders' embeddings are replaced by the image tokens ─► frozen LLM ─► caption loss

Only the projector learns (4.7M parameters in the seed recipe): the encoder already sees, the LLM already
speaks, and the projector learns to translate one into the other. This file adds only what is new - the
encoder, the projector, the VLM glue, caption batches, caption scoring - and imports the LLM, generation and
the training loop from pretrain.py. On Shapes World the frozen encoder is first trained by shapes_encoder.py,
the stand-in for ImageNet pretraining.
"""
import hashlib
import itertools
import json
import math
import os
import shutil

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from config import ConfigError, get_config, run
from data import shapes_world
from data.captions import caption_set
from data.prepare_text import BOS_ID, EOS_ID, EOT_ID, IMAGE_ID, PAD_ID, SPECIAL_TOKENS, DataError, Progress
from pretrain import (TrainingError, Transformer, check_phase, encode, flops_per_token, generate, load_checkpoint,
                      load_model_state, load_tokenizer, model_from_checkpoint, once_per_node, setup_device, train)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------------------
# The vision encoder: a torchvision VisionTransformer, frozen
# ----------------------------------------------------------------------------------------------------------

def build_vision_transformer(config):
    """The encoder's architecture, with random weights (load_vision_weights fills them in).
    vit_b_16: 224 px, 16 px patches -> 14 x 14 = 196 patch tokens of 768 dims, 86M parameters.
    shapes_vit: 48 px Shapes World images, 8 px patches -> 6 x 6 = 36 patch tokens of 128 dims, 0.8M. At 48 px
    each cell of Shapes World's 3 x 3 grid is exactly 2 x 2 patches, so no patch straddles two cells."""
    from torchvision.models import VisionTransformer, vit_b_16
    if config["vision_model"] == "vit_b_16":
        return vit_b_16()
    if config["vision_model"] == "shapes_vit":
        return VisionTransformer(image_size=config["image_size"], patch_size=8, num_layers=4, num_heads=4,
                                 hidden_dim=128, mlp_dim=512)
    raise ConfigError(f"unknown --vision_model={config['vision_model']}; use vit_b_16 or shapes_vit")


def image_transform(config):
    """Pillow image -> normalised (3, H, W) tensor. vit_b_16 uses its ImageNet weights' own preprocessing
    (resize 256, centre-crop 224); Shapes World images are simply resized. Any image mode becomes RGB."""
    from torchvision import transforms
    if config["vision_model"] == "vit_b_16":
        resize = [transforms.Resize(256), transforms.CenterCrop(224)]
    else:
        resize = [transforms.Resize((config["image_size"], config["image_size"]))]
    return transforms.Compose([to_rgb, *resize, transforms.ToTensor(),
                               transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def to_rgb(image):
    """Any Pillow mode as 8-bit RGB. 16- and 32-bit grey images are rescaled to 0..255 first, since a plain
    convert("RGB") would clip them to white."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        values = np.asarray(image, dtype=np.float32)
        span = max(float(values.max() - values.min()), 1e-6)
        from PIL import Image
        image = Image.fromarray(((values - values.min()) / span * 255).astype(np.uint8))
    return image.convert("RGB")


def open_image(path, max_pixels=50_000_000):
    """A Pillow image from path, fully decoded, or a DataError that says what is wrong with the file."""
    import warnings
    from PIL import Image, UnidentifiedImageError
    if not os.path.exists(path):
        raise DataError(f"no such image: {path}")
    if os.path.isdir(path):
        raise DataError(f"{path} is a directory, not an image")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            if image.width * image.height > max_pixels:
                raise DataError(f"{path} is {image.width} x {image.height} pixels, more than the "
                                f"{max_pixels:,} accepted; resize it first")
            image.load()
    except UnidentifiedImageError:
        raise DataError(f"{path} is not an image Pillow can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(f"{path} is too large to decode safely (a decompression bomb?); resize it first") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise DataError(f"{path} is truncated or corrupt ({str(error)[:80]})") from None
    return image


def patch_tokens(vit, images, layer=-1):
    """The patch tokens (B, patches, vision_dim) of a torchvision VisionTransformer, CLS token dropped:
    after the final LayerNorm (layer=-1), or the output of an earlier block (layer=-2: the penultimate,
    which LLaVA uses)."""
    x = vit._process_input(images)                                      # (B, patches, vision_dim)
    x = torch.cat([vit.class_token.expand(x.shape[0], -1, -1), x], dim=1)
    x = vit.encoder.dropout(x + vit.encoder.pos_embedding)
    blocks = vit.encoder.layers
    x = vit.encoder.ln(blocks(x)) if layer == -1 else blocks[:len(blocks) + layer + 1](x)
    return x[:, 1:]


def load_vision_weights(vit, config, device):
    """Fill the encoder with config["vision_weights"]: "IMAGENET1K_V1" (torchvision's download), "shapes"
    (the Shapes World stand-in, trained once and cached), a local state-dict path, or "none" (random)."""
    name = config["vision_weights"]
    if name == "none":
        return
    if name == "IMAGENET1K_V1":
        state = once_per_node(imagenet_weights)  # one download per machine; its other processes read the file
    elif name == "shapes":
        from shapes_encoder import shapes_encoder_weights  # the stand-in for ImageNet, in its own file
        state = shapes_encoder_weights(config, device)
    else:
        if not os.path.isfile(name):
            raise DataError(f"--vision_weights={name}: no such file (use IMAGENET1K_V1, shapes, none or a .pth path)")
        state = load_checkpoint(name, make_it="torch.save(model.state_dict(), PATH) of a torchvision ViT")
    state = {k: v for k, v in state.items() if not k.startswith("heads.")}  # the classifier is not used
    try:
        missing, unexpected = vit.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shapes that do not match
        missing, unexpected = [str(error).splitlines()[1].strip()[:120]], []
    missing = [k for k in missing if not k.startswith("heads.")]
    if missing or unexpected:
        raise DataError(f"--vision_weights={name} does not fit --vision_model={config['vision_model']} "
                        f"(missing or mismatched: {missing[:2]}, unexpected: {unexpected[:2]})")


def imagenet_weights():
    """torchvision's ImageNet-1K ViT-B/16 weights, downloaded once into torch's hub cache."""
    from torchvision.models import ViT_B_16_Weights
    weights = ViT_B_16_Weights.IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=True)
    except OSError as error:  # URLError and socket errors are OSErrors
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
        raise DataError(f"cannot download the ViT-B/16 ImageNet weights ({type(error).__name__}); put "
                        f"{os.path.basename(weights.url)} from {weights.url} at {cached}, or pass "
                        f"--vision_weights=PATH to a local state dict") from None


# ----------------------------------------------------------------------------------------------------------
# The projector and the VLM
# ----------------------------------------------------------------------------------------------------------

def pixel_shuffle(x, factor):
    """Fold each factor x factor square of neighbouring patch tokens into one token with factor^2 times the
    channels: (B, g*g, D) -> (B, (g/factor)^2, D * factor^2). A pure rearrangement - no information is lost -
    that cuts the number of image tokens the LLM must attend over by factor^2 (Llama 4 and nanoVLM do this)."""
    if factor == 1:
        return x
    B, N, D = x.shape
    g = math.isqrt(N)
    x = x.view(B, g // factor, factor, g // factor, factor, D)         # (B, rows, dy, cols, dx, D)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, (g // factor) ** 2, factor * factor * D)


class Projector(nn.Module):
    """Linear -> GELU -> Linear from the encoder's width (times factor^2 after pixel shuffle) to the LLM's."""

    def __init__(self, in_dim, hidden, out_dim):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class VLM(nn.Module):
    """Frozen encoder + trainable projector + LLM (frozen in phase 2, trained in phase 3)."""

    def __init__(self, llm, vit, config):
        super().__init__()
        self.llm, self.vit = llm, vit
        self.vision_layer, self.shuffle = config["vision_layer"], config["pixel_shuffle"]
        if not -len(vit.encoder.layers) <= self.vision_layer <= -1:
            raise ConfigError(f"--vision_layer={self.vision_layer}: use -1 (after the final norm) down to "
                              f"-{len(vit.encoder.layers)} (the first block's output)")
        grid = vit.image_size // vit.patch_size
        if grid % self.shuffle:
            raise ConfigError(f"--pixel_shuffle={self.shuffle} must divide the {grid} x {grid} patch grid")
        self.n_image_tokens = (grid // self.shuffle) ** 2
        if self.n_image_tokens + 3 > llm.config["context"]:  # <|begin_of_text|>, the image, a token, the end
            raise ConfigError(f"an image is {self.n_image_tokens} tokens, too many for the LLM's context of "
                              f"{llm.config['context']}; raise --pixel_shuffle or lower --image_size")
        self.projector = Projector(vit.hidden_dim * self.shuffle ** 2, config["projector_hidden"],
                                   llm.config["dim"])
        self.config = llm.config  # the LLM's sizes, for generation and FLOP counting
        vit.requires_grad_(False)

    def train(self, mode=True):
        super().train(mode)
        self.vit.eval()  # the frozen encoder always runs in inference mode
        return self

    @torch.no_grad()
    def image_features(self, images):
        """Frozen encoder: images (B, 3, H, W) -> patch tokens (B, patches, vision_dim)."""
        return patch_tokens(self.vit, images, self.vision_layer)

    def embed(self, tokens, features):
        """Token embeddings with each row's <|image|> placeholders replaced, in order, by its projected
        image tokens. tokens (B, T) holding n_image_tokens placeholders per row; features (B, patches, D)."""
        embeds = self.llm.embed_tokens(tokens)                          # (B, T, dim)
        image_tokens = self.projector(pixel_shuffle(features.to(embeds.dtype), self.shuffle))
        return embeds.masked_scatter((tokens == IMAGE_ID)[..., None], image_tokens.to(embeds.dtype))

    def forward(self, tokens, targets=None, features=None, images=None, expert_counts=False):
        """The LLM's outputs (see Transformer.forward) on the text with the images' tokens in it. With targets,
        the logits are of the positions that have one (at_targets): most are the image's and the prompt's."""
        if features is None:
            features = self.image_features(images)
        return self.llm(embeds=self.embed(tokens, features), targets=targets, expert_counts=expert_counts,
                        at_targets=targets is not None)


def check_tokenizer(tokenizer, path):
    """Phase 2 relies on the special tokens sitting at their fixed ids."""
    for token_id, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != token_id:
            raise TrainingError(f"{path} uses a tokenizer without {token} at id {token_id}; make the phase-1 "
                                f"checkpoint with this project's: python pretrain.py")


def build_vlm(config, device):
    """The phase-1 LLM (frozen), the encoder with its weights (frozen) and a fresh projector."""
    llm, tokenizer, llm_state = model_from_checkpoint(config["llm_ckpt"], "python pretrain.py")
    check_tokenizer(tokenizer, config["llm_ckpt"])
    llm.requires_grad_(False)
    vit = build_vision_transformer(config)
    load_vision_weights(vit, config, device)
    return VLM(llm, vit, config), tokenizer, llm_state


def vlm_from_checkpoint(path, make_it="python align.py", device="cpu"):
    """(VLM in eval mode, tokenizer, checkpoint) from a phase-2 or phase-3 checkpoint."""
    state = load_checkpoint(path, make_it)
    if "llm_config" not in state:
        raise TrainingError(f"{path} is not a phase-2 or phase-3 checkpoint; make one with: {make_it}")
    tokenizer = load_tokenizer(state["tokenizer"])
    vlm = VLM(Transformer(state["llm_config"]), build_vision_transformer(state["config"]), state["config"])
    load_model_state(vlm, state["model"], path)
    return vlm.to(device).eval(), tokenizer, state


# ----------------------------------------------------------------------------------------------------------
# Caption data: token sequences, cached encoder features, batches
# ----------------------------------------------------------------------------------------------------------

def caption_sequence(caption_ids, n_image_tokens, prompt_ids=()):
    """(tokens, targets) of one caption: <|begin_of_text|> <|image|> x n  prompt  caption <|end_of_text|>.
    targets[t] is the token after position t, or -100 (no loss) where that is an image placeholder or the
    prompt: the model is scored only on the caption and its end token."""
    head = [BOS_ID] + [IMAGE_ID] * n_image_tokens + list(prompt_ids)
    targets = [-100] * (len(head) - 1) + caption_ids + [EOS_ID]
    return head + caption_ids, targets                                  # the end token is a target only


def caption_prompt(tokenizer, config):
    """The token ids between the image and its caption: config["caption_prompt"], "\ncaption:" by default.
    The image takes the place of the first statement of a pretraining document, and the prompt is the
    corpus's own cue to restate it (Shapes World documents say "...\ncaption: a large red circle ..."), so
    the frozen LLM is asked for a skill it already has. It lifts exact captions by about 5 points."""
    return encode(tokenizer, config.get("caption_prompt", ""))  # checkpoints from before the key have none


def compute_features(vlm, images, transform, path, device, source, batch_size=64):
    """Encode every image once with the frozen encoder into a float16 .npy file (memory-mapped, so COCO's
    118k x 196 x 768 features need not fit in RAM). Reused while the fingerprint (encoder weights, layer,
    the `source` description of the images, their number) matches. Returns the memmap."""
    fingerprint = hashlib.sha1()
    for tensor in vlm.vit.state_dict().values():
        fingerprint.update(tensor.detach().cpu().float().numpy().tobytes()[:256])
    fingerprint.update(f"{vlm.vision_layer} {source} {len(images)}".encode())
    stamp = path + ".json"
    if os.path.exists(stamp):
        with open(stamp) as f:
            if json.load(f).get("fingerprint") == fingerprint.hexdigest():
                return np.load(path, mmap_mode="r")
    if os.path.exists(stamp):
        os.remove(stamp)  # stale: a run cut short while rewriting the features must not look complete
    with torch.no_grad():
        first = vlm.image_features(transform(images[0]())[None].to(device))
    shape = (len(images), *first.shape[1:])                             # (images, patches, vision_dim)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    size = math.prod(shape) * 2                                         # float16: 2 bytes a number
    check_free_space(path, size)
    print(f"caching the image features -> {path} ({len(images):,} images, {size / 1e9:.2f} GB)", flush=True)
    features = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=shape)
    progress = Progress(f"encoding {os.path.basename(path)}", len(images), "images")
    for start in range(0, len(images), batch_size):
        batch = torch.stack([transform(load()) for load in images[start:start + batch_size]]).to(device)
        features[start:start + len(batch)] = vlm.image_features(batch).float().cpu().numpy()
        progress.update(start + len(batch))
    features.flush()
    with open(stamp, "w") as f:
        json.dump({"fingerprint": fingerprint.hexdigest()}, f)
    return np.load(path, mmap_mode="r")


def check_free_space(path, needed):
    """Stop, before writing, when the disk cannot hold a file of `needed` bytes at path (a file already
    there is overwritten, so its space counts as free). The full recipe's COCO features are ~35 GB."""
    folder = os.path.dirname(path) or "."
    free = shutil.disk_usage(folder).free + (os.path.getsize(path) if os.path.exists(path) else 0)
    if needed > free:
        raise DataError(f"caching image features needs {needed / 1e9:.1f} GB for {path}, but {folder} has "
                        f"{free / 1e9:.1f} GB free; free some space, pass an --out_dir on a larger disk, or "
                        f"--cache_features=False to run the encoder on every batch instead")


def caption_examples(split, vlm, tokenizer, config):
    """Phase 2's examples: the split's CaptionSet and the (tokens, targets) sequence of each of its pairs."""
    data = caption_set(config, split)
    prompt = caption_prompt(tokenizer, config)
    room = min(config["max_caption_tokens"], vlm.config["context"] - vlm.n_image_tokens - len(prompt) - 2)
    spaced = (lambda text: f" {text}") if prompt else (lambda text: text)  # after "caption:" a word, with its space
    encoded = [encode(tokenizer, spaced(text))[:room] for _, text in data.pairs]  # longer captions are cut
    return data, [caption_sequence(ids, vlm.n_image_tokens, prompt) for ids in encoded]


def right_pad(sequences):
    """(tokens, targets), each (B, longest), of a list of (tokens, targets) sequences: tokens padded with
    <|pad|>, targets with -100, so that padding is never a target."""
    length = max(len(tokens) for tokens, _ in sequences)
    tokens = torch.full((len(sequences), length), PAD_ID)
    targets = torch.full((len(sequences), length), -100)
    for i, (seq_tokens, seq_targets) in enumerate(sequences):
        tokens[i, :len(seq_tokens)] = torch.tensor(seq_tokens)
        targets[i, :len(seq_targets)] = torch.tensor(seq_targets)
    return tokens, targets


def batches_by_length(lengths, batch_size, n_batches, generator):
    """Rows for n_batches batches, with little padding: n_batches * batch_size rows drawn at random (as one
    batch of that size would be), sorted by the length of their sequence, cut into batches of neighbours, and
    shuffled. A batch is as long as its longest row: a random batch of 32 Shapes World conversations (67 tokens
    on average, 28 to 112) is 1.4 times as long as its mean row, so 29 % of phase 3's compute was padding.
    Two uses (config's group_by_length):
      n_batches = grad_accum_steps   phase 3: two micro-batches of 16 make one step on exactly the rows of one
                                     random batch of 32, with that batch's gradient (pretrain.loss_shares),
                                     in two pieces of similar length; a step takes 7-18 % less time.
      n_batches > grad_accum_steps   phase 2: 16 batches of 32 at a time, so successive steps see rows of
                                     similar length; 14 % less time, but which rows share a step changes.
                                     Phase 3 learned worse that way (93.8 % of answers against 97.0 %);
                                     phase 2 did not. LLaVA batches by length too (group_by_modality_length).
    """
    rows = torch.randint(len(lengths), (n_batches * batch_size,), generator=generator).tolist()
    rows.sort(key=lambda row: lengths[row])
    batches = [rows[start:start + batch_size] for start in range(0, len(rows), batch_size)]
    return [batches[i] for i in torch.randperm(n_batches, generator=generator).tolist()]


class CaptionBatches:
    """Random batches of image + text sequences with the images' features (cached) or pixels (computed each
    step). `examples(split, vlm, tokenizer, config)` gives each split's (CaptionSet, sequences): captions in
    phase 2 (caption_examples), conversations in phase 3 (instruct.conversation_examples). Training batches
    come in groups of config["group_by_length"], batched by length (batches_by_length)."""

    def __init__(self, vlm, tokenizer, config, device, rank=0, examples=caption_examples):
        self.device, self.batch_size, self.eval_iters = device, config["batch_size"], config["eval_iters"]
        self.groups, self.queue = config["group_by_length"], []  # the queue: rows of the group's batches to come
        self.transform = image_transform(config)
        self.sets, self.features, self.sequences = {}, {}, {}
        for split in ("train", "val"):  # a Hub dataset is downloaded once per machine, then read by the others
            self.sets[split], self.sequences[split] = once_per_node(lambda: examples(split, vlm, tokenizer, config))
            if config["cache_features"]:
                self.features[split] = self.cached_features(vlm, self.sets[split], split, config, device)
        self.lengths = [len(tokens) for tokens, _ in self.sequences["train"]]  # what batches_by_length sorts by
        self.generator = torch.Generator().manual_seed(config["seed"] + rank)

    def cached_features(self, vlm, data, split, config, device):
        """The split's features from the cache, written by the first process of each machine."""
        path = os.path.join(config["out_dir"], f"features_{split}.npy")
        source = " ".join(str(config[k]) for k in ("caption_source", "caption_dataset", "instruct_source",
                                                   "image_folder", "image_size", "seed", "train_images",
                                                   "eval_images"))
        return once_per_node(lambda: compute_features(vlm, data.images, self.transform, path, device, source))

    def features_of(self, vlm, split, rows):
        """Encoder features (B, patches, D) of the images of the given rows: cached, or computed now."""
        batch = self.batch(split, rows)
        return batch["features"] if "features" in batch else vlm.image_features(batch["images"])

    def batch(self, split, rows):
        """Right-padded (tokens, targets) of the given caption rows, plus their features or images."""
        data = self.sets[split]
        tokens, targets = right_pad([self.sequences[split][r] for r in rows])
        images = [data.pairs[r][0] for r in rows]
        batch = dict(tokens=tokens.to(self.device), targets=targets.to(self.device))
        if split in self.features:
            batch["features"] = torch.from_numpy(np.stack([self.features[split][i] for i in images])).to(self.device)
        else:
            batch["images"] = torch.stack([self.transform(data.images[i]()) for i in images]).to(self.device)
        return batch

    def next(self, split="train"):
        if split != "train":
            raise ValueError("CaptionBatches.next draws training batches; eval_batches gives the held-out ones")
        if not self.queue:
            self.queue = batches_by_length(self.lengths, self.batch_size, self.groups, self.generator)
        return self.batch("train", self.queue.pop())

    def eval_batches(self):
        n = min(len(self.sets["val"].pairs), self.eval_iters * self.batch_size)
        return [self.batch("val", list(range(s, min(s + self.batch_size, n)))) for s in range(0, n, self.batch_size)]

    @staticmethod
    def loss_counts(batch):
        """How many targets a batch's loss is the mean over (a tensor on its device), for pretrain.loss_shares."""
        return (batch["targets"] != -100).sum()

    def state_dict(self):
        return {"generator": self.generator.get_state(), "queue": [list(rows) for rows in self.queue]}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])
        self.queue = [list(rows) for rows in state.get("queue", [])]


# ----------------------------------------------------------------------------------------------------------
# Captioning and its score
# ----------------------------------------------------------------------------------------------------------

@torch.no_grad()
def caption_images(vlm, features, max_new_tokens=64, before=(BOS_ID,), after=(), **sampling):
    """Generated token ids (one list per image) for a batch of encoder features (B, patches, D), with the KV
    cache: the prefix `before` <|image|> x n `after` is embedded once, then tokens are generated until an end
    token. Phase 2 captions with before = <|begin_of_text|>; phase 3 wraps the image and a question in a
    turn. `after` is shared by all images, or a (B, length) tensor with one row per image."""
    B, device = len(features), features.device
    head = torch.tensor([*before, *[IMAGE_ID] * vlm.n_image_tokens], device=device).expand(B, -1)
    after = after if torch.is_tensor(after) else torch.tensor(list(after), dtype=torch.long, device=device).expand(B, -1)
    prefix = torch.cat([head, after], dim=1)
    if prefix.shape[1] >= vlm.config["context"]:
        raise ConfigError(f"the prompt takes {prefix.shape[1]} tokens with the image but the model's context is "
                         f"{vlm.config['context']}; shorten it")
    new_ids = generate(vlm.llm, None, max_new_tokens, embeds=vlm.embed(prefix, features), **sampling)
    return until_end(new_ids)


def until_end(new_ids):
    """Each row of generated ids (B, T), as a list, up to its first end token."""
    return [list(itertools.takewhile(lambda t: t not in (EOS_ID, EOT_ID), row)) for row in new_ids.tolist()]


def held_out_captions(vlm, batches, tokenizer, n_images, prompt=(), before=(BOS_ID,), batch_size=100):
    """[(greedy caption, scene)] of the first n held-out Shapes World scenes. `prompt`: the token ids after the
    image (caption_prompt's, as in training); `before`: those before it. A chat model (phase 3, DPO) is asked in
    a turn instead: before, prompt = instruct.question_prefix(tokenizer, instruct.CAPTION_REQUEST)."""
    data = batches.sets["val"]
    was_training = vlm.training
    vlm.eval()
    captions, n_images = [], min(n_images, len(data.scenes))
    for start in range(0, n_images, batch_size):
        rows = list(range(start, min(start + batch_size, n_images)))
        features = batches.features_of(vlm, "val", rows)
        for row, ids in zip(rows, caption_images(vlm, features, before=before, after=prompt)):
            captions.append((tokenizer.decode(ids), data.scenes[data.pairs[row][0]]))
    vlm.train(was_training)
    return captions


def caption_scores(captions):
    """The mean of each score of shapes_world.score_caption over [(caption, scene)]: "caption exact" counts a
    caption right only when every shape's kind, colour, size and position is right and none is missing or extra."""
    totals = {}
    for text, scene in captions:
        for key, value in shapes_world.score_caption(text, scene).items():
            totals[key] = totals.get(key, 0.0) + float(value)
    return {f"caption {k}": v / len(captions) for k, v in totals.items()}


def caption_accuracy(vlm, batches, tokenizer, n_images, prompt=(), batch_size=100):
    """Greedy captions of n held-out Shapes World scenes, scored against the truth (caption_scores).
    `prompt`: the caption prompt's token ids (caption_prompt), as in training."""
    if batches.sets["val"].scenes is None:
        return {}
    return caption_scores(held_out_captions(vlm, batches, tokenizer, n_images, prompt, batch_size=batch_size))


# ----------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------

def set_epochs(config, n_examples, world):
    """With --epochs=N > 0, max_iters becomes N passes over n_examples at the global batch size."""
    if config["epochs"] > 0:
        config["max_iters"] = config["epochs"] * n_examples // (
            config["batch_size"] * config["grad_accum_steps"] * world)


def main(argv=None):
    config = get_config("align", argv)
    rank, world, device = setup_device(config)
    torch.manual_seed(config["seed"])
    vlm, tokenizer, llm_state = build_vlm(config, device)
    vlm.to(device)
    if config["resume"]:
        saved = load_checkpoint(os.path.join(config["out_dir"], "ckpt.pt"), "the same command without --resume")
        check_phase(saved, config["phase"], os.path.join(config["out_dir"], "ckpt.pt"))
        if saved.get("tokenizer") != tokenizer.to_str():
            raise TrainingError(f"{config['out_dir']}/ckpt.pt was trained on another phase-1 tokenizer than "
                                f"{config['llm_ckpt']}; resume with the --llm_ckpt it was made from")
        # The run's own encoder, before image features are cached from it (--vision_weights may differ now).
        load_model_state(vlm, saved["model"], os.path.join(config["out_dir"], "ckpt.pt"))
    batches = CaptionBatches(vlm, tokenizer, config, device, rank)
    set_epochs(config, len(batches.sets["train"].pairs), world)
    if rank == 0:
        trainable = sum(p.numel() for p in vlm.parameters() if p.requires_grad)
        total = sum(p.numel() for p in vlm.parameters())
        print(f"VLM: {total:,} parameters, {trainable:,} trainable ({100 * trainable / total:.1f}%: the projector); "
              f"{vlm.n_image_tokens} image tokens per image; {len(batches.sets['train'].pairs):,} training "
              f"captions; {config['max_iters']} steps of {config['batch_size']}", flush=True)
    prompt = caption_prompt(tokenizer, config)
    score = lambda m: caption_accuracy(m, batches, tokenizer, config["eval_images"], prompt)
    train(config, vlm, batches, evaluate_extra=score,
          checkpoint_extra=dict(tokenizer=tokenizer.to_str(), llm_config=llm_state["config"]),
          flops_per_token=flops_per_token(llm_state["config"]))
    if rank == 0:
        print(f"saved {os.path.join(config['out_dir'], 'ckpt.pt')}; try: python caption.py some.png")


if __name__ == "__main__":
    run(main)
