"""Phase 4: preference tuning with DPO. Teach the VLM to prefer what is in the picture to what is not.

    python dpo.py                              # Shapes World pairs on the CPU, a few minutes
    python dpo.py --preset=llama4_seed         # RLAIF-V from the Hub, bf16 on CUDA
    python dpo.py --preset=llama4_seed --pref_source="data/rlaif-v/data/*.parquet"   # the same, local files

Phase 3 taught the model to answer; it did not teach it what *not* to say, and it still says "yes" to shapes
that are not in the picture and names shapes it never saw. Direct Preference Optimization (Rafailov et al.,
2023) trains on pairs of responses to one prompt, a preferred y_w and a rejected y_l. It raises the policy's
log-odds of y_w over y_l, measured against a frozen copy of the starting model, the *reference*:

    loss = -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))])

Each log-prob is summed over the response's tokens only (image, prompt and padding are masked, as in phase 3's
targets; by default a rejected response only up to its first wrong token: --cut_rejected, see render_pair).
beta * (log pi - log ref) is a response's *implicit reward*, and the bracket times beta is the pair's reward
margin. At the start policy = reference: every margin is 0 and the loss is ln 2. The reference is what
keeps DPO from driving the rejected response's probability to zero at any cost: the loss only rewards moving
away from the reference as far as the margin needs (a small beta lets the policy move further). By default the
loss is DPO-Positive's (--dpop_lambda, see dpo_loss), which also keeps the chosen response from becoming less
likely than under the reference.

Policy and reference both start from the phase-3 checkpoint; the vision encoder stays frozen, the projector and
the LLM train. The training loop is pretrain.py's, the VLM and its generation align.py's, the chat format and
the answer score instruct.py's; this file adds the loss, the preference pairs and their evaluation.
"""
import contextlib
import copy
import glob
import io
import os
import random
import re
from collections import namedtuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from align import (caption_scores, compute_features, held_out_captions, image_transform, open_image, right_pad,
                   set_epochs, until_end, vlm_from_checkpoint)
from config import get_config
from data import shapes_world
from data.captions import load_or_explain, shapes_captions
from data.prepare_text import IMAGE_ID, DataError, held_out
from instruct import (CAPTION_REQUEST, IMAGE_MARKER, answer_accuracy, question_prefix, render_conversation,
                      shapes_conversations)
from pretrain import (KVCache, autocast_dtype, evaluate, flops_per_token, generate, run, setup_device, target_positions,
                      train)


# ----------------------------------------------------------------------------------------------------------
# The DPO loss
# ----------------------------------------------------------------------------------------------------------

def sequence_logprobs(logits, targets):
    """log p(response | prompt) of each row: the sum over the positions t with targets[t] != -100 of
    log softmax(logits[t])[targets[t]]. logits (B, T, vocab), targets (B, T) -> (B,)."""
    token_logprobs = -F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                                      reduction="none")            # (B * T,), exactly 0 where ignored
    return token_logprobs.view(targets.shape).sum(-1)


def dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta, dpop_lambda=0.0):
    """(mean loss, reward margin of each pair) from the four (B,) summed log-probs.

    With dpop_lambda > 0 the loss is DPO-Positive's (DPOP, Pal et al. 2024): inside the sigmoid the margin loses
    beta * dpop_lambda * max(0, log ref(y_w) - log pi(y_w)), a penalty only where the chosen response has become
    *less* likely than under the reference. Plain DPO can raise the margin by lowering both responses, the
    chosen one less; when they differ in one word ("bottom left" against "bottom right") it does, and the
    probability they lose goes to words neither of them had. The margin returned (pref acc, margin) is DPO's."""
    margins = beta * ((policy_chosen - reference_chosen) - (policy_rejected - reference_rejected))
    fallen = F.relu(reference_chosen - policy_chosen)  # how far log pi(y_w) fell below log ref(y_w); 0 if it rose
    return -F.logsigmoid(margins - beta * dpop_lambda * fallen).mean(), margins


class DPO(nn.Module):
    """The policy (a VLM that trains) and its frozen reference; forward returns (reward margins, DPO loss, MoE
    aux loss), so pretrain.train runs it like any other model.

    A batch holds 2B sequences: rows 0..B-1 the chosen responses, rows B..2B-1 the rejected ones to the same B
    prompts, with the B images' encoder features (each pair's two rows share one image).

    The reference's log-probs are computed here, at every step, without gradient, rather than once for the
    whole dataset before training. Each pair is seen about once (a DPO run is an epoch or a few), so
    precomputing would cost the same forward passes, only all up front; per step, there is no cache to keep in
    step with the data order, DDP's shards and --resume, and the reference runs under the same --dtype as the
    policy. The price is the reference's weights in memory: no gradients, no optimizer state, a small part of
    what the policy's training holds.
    """

    def __init__(self, policy, beta, nll_coef=0.0, dpop_lambda=0.0):
        super().__init__()
        self.policy, self.beta, self.nll_coef, self.dpop_lambda = policy, beta, nll_coef, dpop_lambda
        self.eval_margins = []  # the margins of eval-mode forward passes since evaluate_dpo last read them
        # The reference: a frozen copy of the policy as it starts. Deliberately not a registered submodule: the
        # optimizer, DDP, .train(), the experts' usage statistics and the checkpoint see the policy alone (the
        # reference needs no saving: it is --instruct_ckpt).
        object.__setattr__(self, "reference", copy.deepcopy(policy).requires_grad_(False).eval())

    def forward(self, tokens, targets, features=None, images=None, expert_counts=False):
        """(reward margins (B,), DPO loss, the policy's MoE aux loss), and with expert_counts=True the policy's
        routed slots per expert (see Transformer.forward)."""
        if features is None:
            features = self.policy.image_features(images)              # the frozen encoder, shared by both
        features = torch.cat([features, features])                     # (2B, patches, D): chosen, then rejected
        # Logits of the response tokens only, (2B, K, vocab): the positions target_positions picks (at_targets).
        logits, _, aux_loss, *counts = self.policy.llm(embeds=self.policy.embed(tokens, features), targets=targets,
                                                       expert_counts=expert_counts, at_targets=True)
        with torch.no_grad():
            reference_logits = self.reference(tokens, targets=targets, features=features)[0]
        targets = targets.gather(1, target_positions(targets))         # (2B, K), as the logits are laid out
        policy = sequence_logprobs(logits, targets).chunk(2)           # (chosen (B,), rejected (B,))
        reference = sequence_logprobs(reference_logits, targets).chunk(2)
        loss, margins = dpo_loss(*policy, *reference, self.beta, self.dpop_lambda)
        if not self.training:  # pretrain.evaluate's pass over the held-out pairs: evaluate_dpo reads them
            self.eval_margins.append(margins.detach().float())
        if self.nll_coef:  # plus the chosen responses' own language-model loss (see --nll_coef)
            B = len(margins)
            loss = loss + self.nll_coef * F.cross_entropy(logits[:B].flatten(0, 1).float(), targets[:B].flatten(),
                                                          ignore_index=-100)
        return (margins, loss, aux_loss, *counts)

    # The checkpoint holds the policy's state dict, exactly a phase-3 VLM's: caption.py and vlm_from_checkpoint
    # read out/dpo/ckpt.pt as they read out/instruct/ckpt.pt.
    def state_dict(self, *args, **kwargs):
        return self.policy.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        return self.policy.load_state_dict(state_dict, strict, assign)


# ----------------------------------------------------------------------------------------------------------
# Preference pairs, and batches of them
# ----------------------------------------------------------------------------------------------------------
# A pair is an image, a prompt and two responses. The prompt is rendered as one chat turn, as in phase 3; a
# Shapes World caption is asked for with instruct.CAPTION_REQUEST ("describe the picture."), as phase 3 taught
# and as caption.py asks a chat checkpoint. (A chat model no longer captions in phase 2's turnless form.)

Pair = namedtuple("Pair", "image prompt chosen rejected origin")


def render_response(prompt, response, tokenizer, n_image_tokens, context):
    """(tokens, targets) of one response to the prompt; targets are -100 except on the response and its end."""
    question = prompt if IMAGE_MARKER in prompt else IMAGE_MARKER + prompt  # the image first, as in phase 3
    return render_conversation([(question, response)], tokenizer, n_image_tokens, context)


def render_pair(pair, tokenizer, n_image_tokens, context, cut_rejected=False):
    """The (tokens, targets) of the chosen and of the rejected response, or a DataError if one is cut away.

    With cut_rejected, the rejected response is scored only up to and including its first token that differs
    from the chosen one: its later targets become -100. Shapes World's pairs differ in a word or two ("a small
    red circle" against "a small blue circle ..."), and what the rejected response says after its wrong word is
    conditioned on that word: pushing it down teaches the model not to go on normally after a mistake, and with
    it, not to go on normally at all (a caption that runs on, "a small blue triangle blue star in the ..."). The
    words before the first difference are the same in both responses and cancel in the margin, so what DPO
    pushes down is the one wrong token, given the right beginning. This departs from DPO as published, which
    sums every rejected token; RLAIF-V's responses differ throughout and are scored whole (--cut_rejected=0).
    docs/research.md, "Phase 4: rejected responses cut at their first wrong token"."""
    sides = [render_response(pair.prompt, text, tokenizer, n_image_tokens, context)
             for text in (pair.chosen, pair.rejected)]
    if any(all(t == -100 for t in targets) for _, targets in sides):
        raise DataError("the prompt leaves no room for the response in the context")
    if cut_rejected:
        (_, chosen), (tokens, rejected) = sides
        first = next((t for t, (a, b) in enumerate(zip(chosen, rejected)) if a != b), len(rejected) - 1)
        sides[1] = (tokens, rejected[:first + 1] + [-100] * (len(rejected) - first - 1))
    return sides


def features_at(features, rows, device):
    """Encoder features (len(rows), patches, D) of the given images, from a tensor or a memory-mapped cache."""
    return torch.from_numpy(np.stack([np.asarray(features[row]) for row in rows])).to(device)


class PreferenceBatches:
    """Random batches of preference pairs for pretrain.train: tokens and targets (2B, T) - the B chosen
    responses, then the B rejected ones, right-padded - and the B images' cached encoder features.
    data: {split: (pairs, features)}."""

    def __init__(self, data, tokenizer, n_image_tokens, context, config, device, rank=0):
        self.device, self.batch_size, self.eval_iters = device, config["batch_size"], config["eval_iters"]
        cut = bool(config["cut_rejected"])
        self.pairs, self.features, self.sequences = {}, {}, {}
        for split, (pairs, features) in data.items():
            self.pairs[split], self.sequences[split], self.features[split] = [], [], features
            for pair in pairs:
                try:
                    self.sequences[split].append(render_pair(pair, tokenizer, n_image_tokens, context, cut))
                    self.pairs[split].append(pair)
                except DataError as problem:
                    if rank == 0:
                        print(f"skipping a {split} pair ({problem}): {str(pair.prompt)[:60]!r}", flush=True)
            if not self.pairs[split]:
                raise DataError(f"no {split} preference pair fits in the LLM's context of {context} tokens")
        self.generator = torch.Generator().manual_seed(config["seed"] + rank)

    def batch(self, split, rows):
        sides = [self.sequences[split][r][0] for r in rows] + [self.sequences[split][r][1] for r in rows]
        tokens, targets = right_pad(sides)                             # chosen rows first, then rejected
        features = features_at(self.features[split], [self.pairs[split][r].image for r in rows], self.device)
        return dict(tokens=tokens.to(self.device), targets=targets.to(self.device), features=features)

    def next(self, split="train"):
        rows = torch.randint(len(self.pairs[split]), (self.batch_size,), generator=self.generator)
        return self.batch(split, rows.tolist())

    def eval_pairs(self):
        """How many held-out pairs an evaluation scores: the first eval_iters x batch_size, or all of them."""
        return min(len(self.pairs["val"]), self.eval_iters * self.batch_size)

    def eval_batches(self):
        n = self.eval_pairs()
        return [self.batch("val", list(range(s, min(s + self.batch_size, n)))) for s in range(0, n, self.batch_size)]

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])


def cached_features(vlm, images, split, config, device, rank):
    """The frozen encoder's features of every image, computed once into <out_dir>/features_<split>.npy (rank 0
    writes while the other DDP ranks wait) and memory-mapped."""
    path = os.path.join(config["out_dir"], f"features_{split}.npy")
    source = " ".join(str(config[k]) for k in ("pref_source", "pref_dataset", "pref_scenes", "eval_images",
                                               "image_size", "seed")) + f" {split}"
    transform = image_transform(config)
    if rank == 0:
        compute_features(vlm, images, transform, path, device, source)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return compute_features(vlm, images, transform, path, device, source)  # now a cache hit


# ----------------------------------------------------------------------------------------------------------
# Shapes World pairs: the truth against the phase-3 model's own mistakes and against made-up shapes
# ----------------------------------------------------------------------------------------------------------

WRONG_ANSWERS = {"color": tuple(shapes_world.COLORS), "kind": shapes_world.KINDS, "count": shapes_world.NUMBERS,
                 "position": shapes_world.POSITIONS, "exists": ("yes", "no")}


def corrupt_answer(qtype, truth, rng):
    """A wrong answer of the right form: another colour, kind, number or place; the other of yes and no."""
    return rng.choice([answer for answer in WRONG_ANSWERS[qtype] if answer != truth])


def corrupt_caption(scene, rng):
    """(the scene's caption with one thing made up, what was made up): a shape that is not there, or one shape
    with a wrong colour, kind, size or position."""
    shapes = [dict(shape) for shape in scene["shapes"]]
    empty = [p for p in shapes_world.POSITIONS if p not in {s["position"] for s in shapes}]
    what = rng.choice(("extra shape", "color", "kind", "size", "position") if empty else ("color", "kind", "size"))
    if what == "extra shape":  # a (colour, kind) that the scene does not have, in an empty cell
        present = {(s["color"], s["kind"]) for s in shapes}
        color, kind = rng.choice([(c, k) for c in shapes_world.COLORS for k in shapes_world.KINDS
                                  if (c, k) not in present])
        shapes.append(dict(kind=kind, color=color, size=rng.choice(shapes_world.SIZES), position=rng.choice(empty)))
    elif what == "position":
        rng.choice(shapes)["position"] = rng.choice(empty)
    else:
        shape = rng.choice(shapes)
        values = {"color": tuple(shapes_world.COLORS), "kind": shapes_world.KINDS, "size": shapes_world.SIZES}[what]
        shape[what] = rng.choice([v for v in values if v != shape[what]])
    shapes.sort(key=lambda s: shapes_world.POSITIONS.index(s["position"]))  # a caption lists in reading order
    return shapes_world.caption({"shapes": shapes}), what


@torch.no_grad()
def respond(vlm, features, asks, tokenizer, images_at_once=256, **sampling):
    """The model's response to each (image row, prompt) of `asks`, as text: a caption of at most 64 tokens to
    CAPTION_REQUEST, else an answer of at most 8 (as the answer score allows).

    A scene is asked about ten times, and every prompt begins alike: the turn's opening, then the image's tokens,
    four fifths of it. So the LLM runs that beginning once per image into a KV cache (images_at_once at a time), and
    each prompt continues a copy of its image's (KVCache.rows): a third of the work of running every prompt
    whole. Prompts equally long are generated as one batch, so that none needs padding."""
    llm, device = vlm.llm, vlm.llm.lm_head.weight.device
    head = [*question_prefix(tokenizer, CAPTION_REQUEST)[0], *[IMAGE_ID] * vlm.n_image_tokens]  # every prompt's
    by_image, responses = {}, [None] * len(asks)
    for i, (row, prompt) in enumerate(asks):
        by_image.setdefault(row, []).append(i)
    images = list(by_image)
    for start in range(0, len(images), images_at_once):
        rows = images[start:start + images_at_once]
        shared = KVCache(llm, len(rows), len(head))
        llm(embeds=vlm.embed(torch.tensor(head, device=device).expand(len(rows), -1),
                             features_at(features, rows, device)), cache=shared)
        groups = {}
        for slot, row in enumerate(rows):
            for i in by_image[row]:
                after = question_prefix(tokenizer, asks[i][1])[1]
                groups.setdefault((len(after), asks[i][1] == CAPTION_REQUEST), []).append((i, slot, after))
        for (length, is_caption), group in groups.items():
            max_new = 64 if is_caption else 8
            cache = shared.rows(torch.tensor([slot for _, slot, _ in group], device=device),
                                len(head) + length + max_new)
            after = torch.tensor([list(a) for _, _, a in group], dtype=torch.long, device=device)
            new_ids = generate(llm, after, max_new, cache=cache, **sampling)
            for (i, _, _), ids in zip(group, until_end(new_ids)):
                responses[i] = tokenizer.decode(ids).strip()
    return responses


def shapes_preferences(reference, tokenizer, config, split, device, rank):
    """(pairs, features) from Shapes World scenes of `split` (train: pref_scenes scenes; val: an eighth as many,
    for evaluation only). For every question about a scene and for its caption, the truth is chosen against
    (a) each distinct wrong response of the phase-3 model - its greedy one and pref_samples sampled at
    temperature 1 - labelled by the scene's ground truth, as RLAIF-V ranks its model's own samples; and
    (b) made-up responses: each question one wrong answer of its form (a flipped yes/no, a wrong colour,
    kind, number or place) unless the model gave that one already, each caption `caption_corruptions` captions
    with one made-up detail. The questions are one of each type, as phase 3 asked them; the training pairs add
    shapes_world.binding_questions, the kinds of question phase 3 still gets wrong (where is the large green
    circle, beside a small one? is there a shape in the top left?)."""
    n = config["pref_scenes"] if split == "train" else max(1, config["pref_scenes"] // 8)  # 80:10 as the splits
    scenes = shapes_world.make_scenes(split, n, seed=config["seed"] + 3)  # not the scenes of phases 2 and 3
    images = [lambda scene=scene: shapes_world.render(scene, config["image_size"]) for scene in scenes]
    features = cached_features(reference, images, split, config, device, rank)
    rng = random.Random(f"dpo {config['seed']} {split}")
    asks, truths = [], []
    for row, scene in enumerate(scenes):
        # One question of each type, as phase 3 asks them; in training also the harder ones it still gets wrong
        # (the held-out pairs stay those of phase 3's questions, the ones answer accuracy asks).
        asked = shapes_world.questions(scene, rng)
        if split == "train":
            asked += shapes_world.binding_questions(scene, rng)
        for question, answer, qtype in dict.fromkeys(asked):  # each distinct question once
            asks.append((row, question))
            truths.append((answer, qtype))
        asks.append((row, CAPTION_REQUEST))
        truths.append((shapes_world.caption(scene), "caption"))
    generator = torch.Generator(device).manual_seed(config["seed"])
    attempts = [respond(reference, features, asks, tokenizer)]
    attempts += [respond(reference, features, asks, tokenizer, temperature=1.0, generator=generator)
                 for _ in range(config["pref_samples"])]
    pairs = []
    for i, ((row, prompt), (truth, qtype)) in enumerate(zip(asks, truths)):
        mistakes = list(dict.fromkeys(attempt[i] for attempt in attempts if attempt[i] != truth))
        for mistake in mistakes:
            pairs.append(Pair(row, prompt, truth, mistake, f"own {qtype}"))
        if qtype == "caption":
            for _ in range(config["caption_corruptions"]):
                made_up, what = corrupt_caption(scenes[row], rng)
                pairs.append(Pair(row, prompt, truth, made_up, f"made-up caption {what}"))
        else:
            made_up = corrupt_answer(qtype, truth, rng)
            if made_up not in mistakes:  # not the same pair twice: a yes/no question has one wrong answer, and
                pairs.append(Pair(row, prompt, truth, made_up, f"made-up {qtype}"))  # twice would tip the balance
    return pairs, features


def describe_mix(pairs):
    """One line: how many pairs of each origin."""
    counts = {}
    for pair in pairs:
        counts[pair.origin] = counts.get(pair.origin, 0) + 1
    return ", ".join(f"{origin} {n:,}" for origin, n in sorted(counts.items()))


# ----------------------------------------------------------------------------------------------------------
# RLAIF-V pairs: HuggingFaceH4/rlaif-v_formatted, from the Hub or from local .parquet files
# ----------------------------------------------------------------------------------------------------------
# Columns: images (a list holding one image), prompt ([{"role": "user", "content": [{"type": "image"},
# {"type": "text", "text": question}]}]), chosen and rejected ([{"role": "assistant", "content": [{"type":
# "text", "text": answer}]}]). Splits: train (78,975 pairs) and test (4,157).

def message_text(messages, role):
    """The text of a one-message chat list, with "<image>" where its image part is."""
    if not isinstance(messages, list) or len(messages) != 1 or not isinstance(messages[0], dict) \
            or messages[0].get("role") != role:
        raise DataError(f"expected one {role} message")
    content = messages[0].get("content")
    if isinstance(content, str):
        return content.strip()
    parts = [IMAGE_MARKER if isinstance(part, dict) and part.get("type") == "image" else
             (part.get("text") or "") if isinstance(part, dict) else "" for part in content or []]
    return " ".join(parts).strip()


def decode_image(image):
    """A Pillow image from a `datasets` image struct {"bytes": ..., "path": ...}, fully decoded, or a DataError."""
    from PIL import Image
    if not isinstance(image, dict) or not (image.get("bytes") or image.get("path")):
        raise DataError("no image")
    if not image.get("bytes"):
        return open_image(image["path"])  # align's checks: missing, empty, truncated, too large
    try:
        decoded = Image.open(io.BytesIO(image["bytes"]))
        decoded.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:  # UnidentifiedImageError too
        raise DataError(f"the image cannot be decoded ({type(error).__name__})") from None
    return decoded


def check_preference_record(record):
    """(image struct, prompt, chosen, rejected) of one RLAIF-V-format record, or a DataError saying what is
    wrong. The image is decoded once here, so that a bad one is skipped now rather than stopping a run later."""
    images = record.get("images") or []
    if len(images) != 1:
        raise DataError("no image" if not images else f"{len(images)} images (one per pair is supported)")
    prompt = message_text(record.get("prompt"), "user")
    chosen, rejected = message_text(record.get("chosen"), "assistant"), message_text(record.get("rejected"), "assistant")
    if not chosen or not rejected:
        raise DataError(f"empty {'chosen' if not chosen else 'rejected'} response")
    if chosen == rejected:
        raise DataError("chosen and rejected are the same")
    decode_image(images[0])
    return images[0], prompt, chosen, rejected


def rlaif_preferences(config, split):
    """(image loaders, pairs) of `split`: the Hub's train or test split (pref_source="hf"), or local .parquet files
    (comma-separated paths or glob patterns; every 50th record is held out). Bad records are reported, counted
    and skipped."""
    import datasets
    source = config["pref_source"]
    hint = 'to use local files instead: --pref_source="path/to/*.parquet" (columns images, prompt, chosen, rejected)'
    if source == "hf":
        name = config["pref_dataset"]
        dataset = load_or_explain(lambda: datasets.load_dataset(name, split="test" if split == "val" else "train"),
                                  f"dataset {name} from the Hugging Face Hub", hint)
        in_split = lambda number: True
    else:
        paths = [path for pattern in source.split(",") for path in sorted(glob.glob(pattern))]
        if not paths or not all(path.endswith(".parquet") and os.path.isfile(path) for path in paths):
            raise DataError(f"--pref_source={source}: no .parquet files there (or use shapes or hf)")
        name = source
        dataset = load_or_explain(lambda: datasets.load_dataset("parquet", data_files=paths, split="train"),
                                  f"parquet files {source}", "they need columns images, prompt, chosen and rejected")
        in_split = lambda number: held_out(number) == (split == "val")
    missing = {"images", "prompt", "chosen", "rejected"} - set(dataset.column_names)
    if missing:
        raise DataError(f"{name} lacks the columns {', '.join(sorted(missing))} (has {', '.join(dataset.column_names)})")
    # Undecoded {"bytes", "path"} structs, whether the Hub's Image feature or plain parquet structs.
    dataset = dataset.cast_column("images", datasets.Sequence(datasets.Image(decode=False)))
    images, pairs, skipped, total = [], [], 0, 0
    for number, record in enumerate(dataset):
        if not in_split(number):
            continue
        total += 1
        try:
            image, prompt, chosen, rejected = check_preference_record(record)
        except DataError as problem:
            skipped += 1
            print(f"skipping record {number} of {name} ({split}): {problem}", flush=True)
            continue
        images.append(lambda image=image: decode_image(image))
        pairs.append(Pair(len(images) - 1, prompt, chosen, rejected, "rlaif-v"))
    if skipped:
        print(f"skipped {skipped} of {total} {split} records of {name}", flush=True)
    if not pairs:
        raise DataError(f"no usable {split} record in {name}")
    return images, pairs


def preference_data(reference, tokenizer, config, device, rank):
    """{split: (pairs, features)} for config["pref_source"]: "shapes", "hf" or local .parquet files."""
    if config["pref_source"] == "shapes":
        return {split: shapes_preferences(reference, tokenizer, config, split, device, rank) for split in ("train", "val")}
    data = {}
    for split in ("train", "val"):
        images, pairs = rlaif_preferences(config, split)
        data[split] = pairs, cached_features(reference, images, split, config, device, rank)
    return data


# ----------------------------------------------------------------------------------------------------------
# Evaluation: preference accuracy and margin; on Shapes World also answers, captions and hallucinations
# ----------------------------------------------------------------------------------------------------------

class HeldOutScenes:
    """Held-out Shapes World scenes and their encoder features, in the form instruct.answer_accuracy and
    align.caption_accuracy read: .sets["val"] (a CaptionSet with its scenes) and .features_of(vlm, "val", rows)."""

    def __init__(self, data, vlm, transform, device):
        self.sets = {"val": data}
        with torch.no_grad():
            self.features = torch.cat([vlm.image_features(torch.stack([transform(load()) for load in
                                                                       data.images[s:s + 64]]).to(device))
                                       for s in range(0, len(data.images), 64)])

    def features_of(self, vlm, split, rows):
        return self.features[[self.sets[split].pairs[row][0] for row in rows]]


NAMED_SHAPE = re.compile(rf"\b({'|'.join(shapes_world.COLORS)}) ({'|'.join(shapes_world.KINDS)})\b")


def hallucination(captions):
    """The share of [(caption, scene)] whose caption names a (colour, kind) absent from its scene."""
    made_up = 0
    for text, scene in captions:
        present = {(shape["color"], shape["kind"]) for shape in scene["shapes"]}
        made_up += any(named not in present for named in NAMED_SHAPE.findall(text))
    return made_up / len(captions)


@torch.no_grad()
def evaluate_dpo(dpo, batches, tokenizer, answers=None, captions=None):
    """pref acc (the share of held-out pairs whose reward margin is > 0) and margin (their mean), and pref acc
    on the pairs against the model's own mistakes and on the made-up ones apart; with Shapes World, also
    answer accuracy on phase 3's held-out questions, and the scores and hallucination rate of greedy captions
    of phase 2's held-out scenes, asked for in a turn (CAPTION_REQUEST) as in the pairs."""
    was_training = dpo.training
    dpo.eval()
    # The val loss (pretrain.evaluate, just before) has run every held-out pair through both models; its margins
    # are kept rather than computed again, which would double an evaluation's cost.
    margins = torch.cat(dpo.eval_margins) if dpo.eval_margins else torch.zeros(0)
    dpo.eval_margins.clear()
    if len(margins) != batches.eval_pairs():  # called on its own: run the held-out pairs now
        margins = torch.cat([dpo(**batch)[0].float() for batch in batches.eval_batches()])
        dpo.eval_margins.clear()
    metrics = {"pref acc": (margins > 0).float().mean().item(), "margin": margins.mean().item()}
    # Split by where the rejected response came from: the model's own mistakes are the hard pairs.
    own = torch.tensor([pair.origin.startswith("own") for pair in batches.pairs["val"][:len(margins)]])
    if 0 < own.sum() < len(own):
        metrics["pref acc own"] = (margins[own] > 0).float().mean().item()
        metrics["pref acc made-up"] = (margins[~own] > 0).float().mean().item()
    if answers is not None:
        metrics.update(answer_accuracy(dpo.policy, answers, tokenizer))
        before, after = question_prefix(tokenizer, CAPTION_REQUEST)
        said = held_out_captions(dpo.policy, captions, tokenizer, len(captions.sets["val"].pairs), after, before)
        metrics.update(caption_scores(said))
        metrics["hallucination"] = hallucination(said)
    dpo.train(was_training)
    return metrics


def held_out_scenes(instruct_config, config, vlm, device):
    """(phase 3's held-out questions, phase 2's held-out caption scenes), rebuilt from the phase-3 run's seed."""
    transform, seed = image_transform(config), instruct_config["seed"]
    questions = shapes_conversations("val", instruct_config["eval_images"], seed, config["image_size"])
    scenes = shapes_captions("val", config["eval_images"], seed, config["image_size"])
    return HeldOutScenes(questions, vlm, transform, device), HeldOutScenes(scenes, vlm, transform, device)


# ----------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------

def main(argv=None):
    config = get_config("dpo", argv)
    rank, world, device = setup_device(config)
    torch.manual_seed(config["seed"])
    policy, tokenizer, instruct_state = vlm_from_checkpoint(config["instruct_ckpt"], "python instruct.py", device)
    for key in ("vision_model", "vision_layer", "image_size", "pixel_shuffle", "projector_hidden"):
        config[key] = instruct_state["config"][key]  # the architecture is the phase-3 checkpoint's
    dpo = DPO(policy, config["beta"], config["nll_coef"], config["dpop_lambda"])
    policy.llm.requires_grad_(True)  # the projector and the LLM train; the encoder stays frozen
    policy.projector.requires_grad_(True)
    data = preference_data(dpo.reference, tokenizer, config, device, rank)  # sampled from the phase-3 model
    batches = PreferenceBatches(data, tokenizer, policy.n_image_tokens, policy.config["context"], config, device, rank)
    set_epochs(config, len(batches.pairs["train"]), world)
    answers = captions = None
    if config["pref_source"] == "shapes":
        answers, captions = held_out_scenes(instruct_state["config"], config, policy, device)
    evaluate_extra = lambda model: evaluate_dpo(model, batches, tokenizer, answers, captions)
    if rank == 0:
        trainable = sum(p.numel() for p in dpo.parameters() if p.requires_grad)
        loss = f"DPO-Positive (lambda {config['dpop_lambda']:g})" if config["dpop_lambda"] else "DPO"
        scored = "up to their first token unlike the chosen one" if config["cut_rejected"] else "whole"
        print(f"VLM: {trainable:,} trainable parameters (LLM + projector) and a frozen reference; {loss}, beta "
              f"{config['beta']}, rejected responses scored {scored}; {config['max_iters']} steps of "
              f"{config['batch_size']} pairs", flush=True)
        for split in ("train", "val"):
            print(f"{split} pairs: {len(batches.pairs[split]):,} ({describe_mix(batches.pairs[split])})", flush=True)
        counted = batches.eval_pairs()
        if counted < len(batches.pairs["val"]):
            print(f"pref acc and margin count the first {counted:,} val pairs (--eval_iters x --batch_size)", flush=True)
        if not config["resume"]:  # step 0, so that before and after are in one log
            amp_dtype = autocast_dtype(config, device)
            autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
            val_loss, _ = evaluate(dpo, batches, autocast)
            metrics = "".join(f" | {k} {v:.3f}" for k, v in evaluate_extra(dpo).items())
            print(f"eval step 0: val loss {val_loss:.4f}{metrics}", flush=True)
    lr_scale = lambda name: config["projector_lr_scale"] if name.startswith("policy.projector.") else 1.0
    train(config, dpo, batches, evaluate_extra=evaluate_extra, lr_scale=lr_scale,
          checkpoint_extra=dict(tokenizer=tokenizer.to_str(), llm_config=instruct_state["llm_config"]),
          flops_per_token=flops_per_token(instruct_state["llm_config"]) * 4 / 3)  # + the reference's forward
    if rank == 0:
        path = os.path.join(config["out_dir"], "ckpt.pt")
        print(f"saved {path}; try: python caption.py some.png --ckpt={path} (a caption) or add "
              f"--prompt \"is there a red circle?\"")


if __name__ == "__main__":
    run(main)
