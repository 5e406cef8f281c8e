"""The Shapes World vision encoder: the stand-in for ImageNet pretraining, run once before phase 2.

    python align.py      # trains it first if out/align/shapes_vit_*.pt is missing (~1.7 min on 2 cores), then caches it

A *randomly initialised* frozen encoder gives patch tokens that are nearly identical to each other: colour
survives, shape kind barely does, and the projector cannot recover what the encoder never extracted.
Real recipes freeze an encoder that was pretrained on ImageNet. Offline we have no such weights, so we
pretrain the small encoder ourselves on what Shapes World images contain: every patch token is taught to
say which cell of the 3x3 grid it lies in, and the kind, colour and size of the shape there (or "empty").
Then the temporary head is dropped and the encoder is frozen, exactly as the real recipe freezes ViT-B/16.

align.py calls shapes_encoder_weights() when --vision_weights=shapes (the default); the real recipe loads
torchvision's ImageNet weights instead and never runs this file.
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from align import build_vision_transformer, image_transform, patch_tokens
from data import shapes_world
from pretrain import train

ATTRIBUTES = (("kind", ("empty",) + shapes_world.KINDS), ("color", ("empty",) + tuple(shapes_world.COLORS)),
              ("size", ("empty",) + shapes_world.SIZES), ("cell", shapes_world.POSITIONS))


def patch_labels(scene, grid):
    """(grid * grid, 4) labels of one scene: kind, colour, size (0 = empty) and cell of each patch."""
    by_cell = {s["position"]: s for s in scene["shapes"]}
    labels = []
    for row in range(grid):
        for col in range(grid):
            cell = shapes_world.POSITIONS[(row * 3 // grid) * 3 + col * 3 // grid]
            shape = by_cell.get(cell)
            labels.append([values.index(shape[attr]) if shape else 0 for attr, values in ATTRIBUTES[:3]]
                          + [shapes_world.POSITIONS.index(cell)])
    return labels


class PatchClassifier(nn.Module):
    """The encoder plus a temporary linear head on every patch token; forward returns (logits, loss, None)
    so that pretrain.train can run it."""

    def __init__(self, vit):
        super().__init__()
        self.vit = vit
        self.sizes = [len(values) for _, values in ATTRIBUTES]
        # Kind is the hard attribute: it needs a shape's outline, which a small shape draws across one or two
        # patches, while colour and size show in any of its pixels. Weighting its loss 4x lifts held-out
        # kind accuracy on the shapes' patches from 78 % to 97 % in the same 600 steps (colour, size, cell
        # stay at 99-100 %).
        self.weights = (4.0, 1.0, 1.0, 1.0)
        self.head = nn.Linear(vit.hidden_dim, sum(self.sizes))
        vit.heads.requires_grad_(False)  # torchvision's ImageNet head: unused (and DDP wants a gradient for all)

    def forward(self, images, labels):
        logits = self.head(patch_tokens(self.vit, images)).split(self.sizes, dim=-1)  # 4 x (B, patches, n)
        loss = sum(weight * F.cross_entropy(l.flatten(0, 1), labels[..., i].flatten())
                   for i, (l, weight) in enumerate(zip(logits, self.weights)))
        return logits, loss, None


class ImageBatches:
    """Rendered Shapes World images with their patch labels, for the encoder's pretraining."""

    def __init__(self, config, device, rank=0):
        grid = config["image_size"] // 8
        transform = image_transform(config)
        self.data = {}
        for split, n in (("train", config["encoder_images"]), ("val", 500)):
            scenes = shapes_world.make_scenes(split, n, seed=config["seed"] + 1)
            images = torch.stack([transform(shapes_world.render(s, config["image_size"])) for s in scenes])
            labels = torch.tensor([patch_labels(s, grid) for s in scenes])
            self.data[split] = (images, labels)
        self.batch_size, self.device = config["batch_size"], device
        self.generator = torch.Generator().manual_seed(config["seed"] + rank)

    def next(self, split="train"):
        images, labels = self.data[split]
        rows = torch.randint(len(images), (self.batch_size,), generator=self.generator)
        return dict(images=images[rows].to(self.device), labels=labels[rows].to(self.device))

    def eval_batches(self):
        images, labels = self.data["val"]
        return [dict(images=images.to(self.device), labels=labels.to(self.device))]

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])


@torch.no_grad()
def patch_accuracy(classifier, batches):
    """Held-out accuracy of each attribute over all patches of the validation images."""
    classifier.eval()
    batch = batches.eval_batches()[0]
    logits, _, _ = classifier(**batch)
    classifier.train()
    right = [l.argmax(-1) == batch["labels"][..., i] for i, l in enumerate(logits)]
    scores = {f"{name} acc": r.float().mean().item() for r, (name, _) in zip(right, ATTRIBUTES)}
    occupied = batch["labels"][..., 0] > 0  # most patches are empty, which is easy: score the shapes alone too
    scores["kind acc on shapes"] = right[0][occupied].float().mean().item()
    return scores


def shapes_encoder_weights(config, device):
    """The trained encoder's state dict, from its cache file; trained first when the file is missing."""
    # Named by every setting that changes the encoder, so that changing one trains a new encoder.
    path = os.path.join(config["out_root"], "align", f"shapes_vit_{config['image_size']}px_"
                        f"{config['encoder_steps']}steps_{config['encoder_images']}images_lr{config['encoder_lr']:g}_"
                        f"seed{config['seed']}.pt")
    missing = not os.path.exists(path)
    if torch.distributed.is_initialized():  # every process trains (DDP) if any machine lacks the file
        flag = torch.tensor(float(missing), device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        missing = bool(flag.item())
    if missing:
        # The encoder's training draws from the global random generator, and the projector is initialised after
        # this call: without the fork a first run (encoder trained here) and a rerun (encoder cached) would start
        # phase 2 from different projectors. (The fork covers the CPU generator, which initialises the weights.)
        with torch.random.fork_rng(devices=[]):
            pretrain_shapes_encoder(config, device, path)
    return torch.load(path, map_location="cpu", weights_only=True)


def flops_per_image(classifier):
    """Training FLOPs per image, counted as pretrain.flops_per_token counts them per token: 6 per matmul weight
    per token (the patch embedding is one matmul per patch) plus attention, 12 * width per query per key; each
    of the patches + 1 tokens (the class token too) attends to all of them. For the log's MFU."""
    vit = classifier.vit
    tokens = (vit.image_size // vit.patch_size) ** 2 + 1
    weights = [vit.conv_proj.weight, classifier.head.weight] + [p for p in vit.encoder.parameters() if p.dim() == 2]
    attention = 12 * vit.hidden_dim * tokens * len(vit.encoder.layers)
    return tokens * (6 * sum(w.numel() for w in weights) + attention)


def pretrain_shapes_encoder(config, device, path):
    """Train the small encoder on Shapes World attributes with the shared training loop; save it to path.
    Under torchrun every rank trains (data-parallel, each on its own batches) and the first process of each
    machine saves, so that every machine has the file even without a shared filesystem."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank == 0:
        print(f"training the Shapes World vision encoder (the stand-in for ImageNet pretraining) -> {path}",
              flush=True)
    torch.manual_seed(config["seed"])
    classifier = PatchClassifier(build_vision_transformer(config))
    # All steps always (max_seconds=0): a cut-short encoder would be cached and reused by every later run.
    encoder_config = dict(config, lr=config["encoder_lr"], min_lr=config["encoder_lr"] / 10, batch_size=64,
                          max_iters=config["encoder_steps"], warmup_iters=50, eval_interval=config["encoder_steps"],
                          log_interval=100, grad_accum_steps=1, resume=False, compile=False, max_seconds=0.0,
                          out_dir=os.path.join(os.path.dirname(path), "shapes_vit_training"), phase="shapes_encoder")
    batches = ImageBatches(encoder_config, device, rank)
    train(encoder_config, classifier, batches, evaluate_extra=lambda m: patch_accuracy(m, batches),
          flops_per_token=flops_per_image(classifier))
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        tmp = f"{path}.{os.getpid()}.tmp"  # two machines sharing a disk must not write the same temporary file
        torch.save(classifier.vit.cpu().state_dict(), tmp)
        os.replace(tmp, path)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # the others read the file once their machine's first process has written it
