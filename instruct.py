"""Phase 3: visual instruction tuning. Teach the VLM to answer questions about an image, in turns.

    python instruct.py                        # Shapes World conversations on the CPU, a few minutes
    python instruct.py --preset=llama4_seed   # LLaVA-Instruct-150K + COCO images, bf16 on CUDA
    python instruct.py --instruct_source=my.json --image_folder=my_images/   # your own LLaVA-format data

A conversation is rendered with the chat markers reserved in the tokenizer:

    <|begin_of_text|><|user|><|image|> x n what color is the circle?<|eot|><|assistant|>red<|eot|>
                    <|user|>how many shapes are there?<|eot|><|assistant|>two<|eot|>

The loss covers the assistant's tokens and their <|eot|> only: the model learns to answer, not to ask.
Unlike phase 2, the LLM trains too (with a small learning rate) and the projector keeps training (with a
larger one); the vision encoder stays frozen. This file adds only the chat format, the conversation data and
the answer scoring; the VLM comes from align.py and the training loop from pretrain.py.
"""
import json
import os
import random

import torch

from align import CaptionBatches, caption_images, set_epochs, vlm_from_checkpoint
from config import get_config, run
from data import shapes_world
from data.captions import CaptionSet
from data.prepare_text import ASSISTANT_ID, BOS_ID, EOT_ID, IMAGE_ID, USER_ID, DataError, held_out
from pretrain import check_phase, encode, flops_per_token, load_checkpoint, setup_device, train

IMAGE_MARKER = "<image>"  # where LLaVA-format text puts the image
CAPTION_REQUEST = "describe the picture."  # how a Shapes World conversation asks for the caption


# ----------------------------------------------------------------------------------------------------------
# The chat format
# ----------------------------------------------------------------------------------------------------------

def render_conversation(turns, tokenizer, n_image_tokens, context):
    """(tokens, targets) of a conversation [(question, answer), ...]. The image's n placeholders go where the
    question holds "<image>". targets[t] is the token after t when that token belongs to an answer (its
    <|eot|> included), else -100. Cut to the context."""
    sequence, is_answer = [BOS_ID], [False]
    for question, answer in turns:
        before, marker, after = question.partition(IMAGE_MARKER)
        user = [USER_ID, *encode(tokenizer, before.strip())]
        if marker:
            user += [IMAGE_ID] * n_image_tokens + encode(tokenizer, after.strip())
        user += [EOT_ID, ASSISTANT_ID]
        reply = encode(tokenizer, answer.strip()) + [EOT_ID]
        sequence += user + reply
        is_answer += [False] * len(user) + [True] * len(reply)
    if IMAGE_ID in sequence[context:]:
        raise DataError("the image does not fit in the context")
    sequence, is_answer = sequence[:context + 1], is_answer[:context + 1]
    targets = [token if answer else -100 for token, answer in zip(sequence[1:], is_answer[1:])]
    return sequence[:-1], targets


def question_prefix(tokenizer, question):
    """The token ids before and after the image placeholders when asking one question: what generation
    continues from (caption.py --prompt and the answer evaluation)."""
    return (BOS_ID, USER_ID), (*encode(tokenizer, question.strip()), EOT_ID, ASSISTANT_ID)


# ----------------------------------------------------------------------------------------------------------
# Conversation data: Shapes World Q&A, or LLaVA-format JSON
# ----------------------------------------------------------------------------------------------------------

def shapes_conversations(split, n, seed, image_size):
    """One conversation per scene: every one of its questions (4 or 5) in a random order, in 30 % of scenes
    with a request for the caption among them, the first turn carrying the image."""
    rng = random.Random(f"{seed} {split}")
    scenes = shapes_world.make_scenes(split, n, seed=seed + 2)
    images = [lambda scene=scene: shapes_world.render(scene, image_size) for scene in scenes]
    pairs = []
    for i, scene in enumerate(scenes):
        turns = [(q, a) for q, a, _ in shapes_world.questions(scene, rng)]
        # Every question, not 1-3 of them: each scene has one fixed conversation, so with 1-3 turns only a
        # third of the 12,000 scenes was asked whether a shape is there or where it is, the two questions that
        # must find a shape by its colour and kind, which phase 3 learns last; and the captions took 46 % of
        # the answer tokens (now 25 %). On three seeds' checkpoints (AMD EPYC cores), 1,600 steps of 1-3 turns
        # answered 95.2-98.2 %, position as low as 82 % on one seed; 900 steps of whole conversations, in less
        # time, 96.8-97.4 %, every question type at 90 % or more on every seed (docs/research.md has both,
        # and where the old way did better; the default is 700 steps since). 30 % of conversations ask for the
        # caption, as about 27 % did.
        if rng.random() < 0.3:
            turns.append((CAPTION_REQUEST, shapes_world.caption(scene)))
        rng.shuffle(turns)
        turns[0] = (IMAGE_MARKER + turns[0][0], turns[0][1])
        pairs.append((i, turns))
    return CaptionSet(images, pairs, scenes, name=f"Shapes World conversations {split}")


def check_record(record, image_folder):
    """The (question, answer) turns of one LLaVA-format record, or a DataError saying what is wrong."""
    turns = record.get("conversations") or []
    if not turns:
        raise DataError("empty conversation")
    if not isinstance(turns, list) or not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns):
        raise DataError('every turn must be {"from": ..., "value": "text"}')
    speakers = [turn.get("from") for turn in turns]
    if len(turns) % 2 or any(s != ("human" if i % 2 == 0 else "gpt") for i, s in enumerate(speakers)):
        raise DataError(f"turns must alternate human, gpt, ... (got {', '.join(map(str, speakers))})")
    markers = sum(turn.get("value", "").count(IMAGE_MARKER) for turn in turns)
    if markers != 1 or IMAGE_MARKER not in turns[0].get("value", ""):
        raise DataError(f"needs exactly one {IMAGE_MARKER} marker, in the first human turn (has {markers})")
    path = os.path.join(image_folder, record.get("image") or "")
    if not record.get("image") or not os.path.isfile(path):
        raise DataError(f"image not found: {path}")
    return path, [(turns[i]["value"], turns[i + 1]["value"]) for i in range(0, len(turns), 2)]


def llava_conversations(config, split):
    """Conversations from a LLaVA-Instruct JSON file (a list of {"id", "image", "conversations": [{"from":
    "human"|"gpt", "value"}]}) and its image folder. Bad records are reported, counted and skipped; every
    50th good record is held out for validation (held_out)."""
    from align import open_image
    source, folder = config["instruct_source"], config["image_folder"]
    try:
        with open(source) as f:
            records = json.load(f)
    except FileNotFoundError:
        raise DataError(f"no such conversation file: {source}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{source} is not JSON ({error})") from None
    if not isinstance(records, list):
        raise DataError(f"{source} must hold a JSON list of conversation records")
    images, pairs, skipped, kept, image_index = [], [], 0, 0, {}
    for number, record in enumerate(records):
        try:
            path, turns = check_record(record if isinstance(record, dict) else {}, folder)
        except DataError as problem:
            skipped += 1
            if split == "train":
                name = record.get("id", "?") if isinstance(record, dict) else "?"
                print(f"skipping record {number} (id {name}) of {source}: {problem}", flush=True)
            continue
        if held_out(kept) == (split == "val"):
            if path not in image_index:  # LLaVA has several conversations per image: encode each image once
                image_index[path] = len(images)
                images.append(lambda path=path: open_image(path))
            pairs.append((image_index[path], turns))
        kept += 1
    if split == "train" and skipped:
        print(f"skipped {skipped} of {len(records)} records of {source}", flush=True)
    return CaptionSet(images, pairs, name=f"{source} {split}")


def conversation_examples(split, vlm, tokenizer, config):
    """Phase 3's examples: the split's conversations as a CaptionSet, and the (tokens, targets) sequence of
    each; a conversation that cannot fit the LLM's context is skipped, loudly."""
    if config["instruct_source"] == "shapes":
        n = config["train_images"] if split == "train" else config["eval_images"]
        data = shapes_conversations(split, n, config["seed"], config["image_size"])
    else:
        data = llava_conversations(config, split)
    kept, sequences = [], []
    for pair in data.pairs:
        try:
            sequences.append(render_conversation(pair[1], tokenizer, vlm.n_image_tokens, vlm.config["context"]))
            kept.append(pair)
        except DataError as problem:  # the question before the image is too long: skip it, loudly
            print(f"skipping a {split} conversation ({problem}): {pair[1][0][0][:60]!r}...", flush=True)
    if not kept:
        raise DataError(f"no {split} conversation of {data.name} fits in the LLM's context")
    data.pairs[:] = kept
    return data, sequences


def ConversationBatches(vlm, tokenizer, config, device, rank=0):
    """Phase 3's batches: align's CaptionBatches, given conversations in place of captions."""
    return CaptionBatches(vlm, tokenizer, config, device, rank, examples=conversation_examples)


# ----------------------------------------------------------------------------------------------------------
# Answer accuracy
# ----------------------------------------------------------------------------------------------------------

def answer_accuracy(vlm, batches, tokenizer):
    """Greedy answers to every question of the held-out Shapes World scenes, scored by exact match, overall
    and per question type (colour, kind, count, position, existence)."""
    data = batches.sets["val"]
    if data.scenes is None:
        return {}
    was_training = vlm.training
    vlm.eval()
    rng = random.Random(0)
    by_prefix = {}  # questions grouped by prompt length, so that each group is one batch without padding
    for row, scene in enumerate(data.scenes):
        for question, answer, kind in shapes_world.questions(scene, rng):
            before, after = question_prefix(tokenizer, question)
            by_prefix.setdefault(len(after), []).append((row, after, answer, kind))
    right, total = {}, {}
    for group in by_prefix.values():
        for start in range(0, len(group), 100):
            chunk = group[start:start + 100]
            features = batches.features_of(vlm, "val", [row for row, _, _, _ in chunk])
            after = torch.tensor([a for _, a, _, _ in chunk], device=features.device)  # (B, question length)
            answers = caption_images(vlm, features, 8, before, after)  # `before` is the same for every question
            for (_, _, expected, kind), ids in zip(chunk, answers):
                ok = shapes_world.score_answer(tokenizer.decode(ids), expected)
                for key in (kind, "all"):
                    right[key] = right.get(key, 0) + ok
                    total[key] = total.get(key, 0) + 1
    vlm.train(was_training)
    return {f"answer {k}": right[k] / total[k] for k in ["all"] + sorted(k for k in total if k != "all")}


# ----------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------

def main(argv=None):
    config = get_config("instruct", argv)
    rank, world, device = setup_device(config)
    torch.manual_seed(config["seed"])
    vlm, tokenizer, align_state = vlm_from_checkpoint(config["align_ckpt"], "python align.py", device)
    if config["resume"]:  # another phase's folder: say so before the feature cache is written into it
        path = os.path.join(config["out_dir"], "ckpt.pt")
        check_phase(load_checkpoint(path, "the same command without --resume"), "instruct", path)
    vlm.llm.requires_grad_(True)  # phase 3 trains the LLM and the projector; the encoder stays frozen
    vlm.projector.requires_grad_(True)
    for key in ("vision_model", "vision_layer", "image_size", "pixel_shuffle", "projector_hidden"):
        config[key] = align_state["config"][key]  # the architecture is the phase-2 checkpoint's
    batches = ConversationBatches(vlm, tokenizer, config, device, rank)
    set_epochs(config, len(batches.sets["train"].pairs), world)
    if rank == 0:
        trainable = sum(p.numel() for p in vlm.parameters() if p.requires_grad)
        print(f"VLM: {sum(p.numel() for p in vlm.parameters()):,} parameters, {trainable:,} trainable (LLM + "
              f"projector); {len(batches.sets['train'].pairs):,} training conversations; "
              f"{config['max_iters']} steps of {config['batch_size']}", flush=True)
    lr_scale = lambda name: config["projector_lr_scale"] if name.startswith("projector.") else 1.0
    train(config, vlm, batches, evaluate_extra=lambda m: answer_accuracy(m, batches, tokenizer), lr_scale=lr_scale,
          checkpoint_extra=dict(tokenizer=tokenizer.to_str(), llm_config=align_state["llm_config"]),
          flops_per_token=flops_per_token(align_state["llm_config"]))
    if rank == 0:
        print(f"saved {os.path.join(config['out_dir'], 'ckpt.pt')}; try: "
              f"python caption.py some.png --prompt \"how many shapes are there?\"")


if __name__ == "__main__":
    run(main)
