"""PVC's ablation at toy scale: Table 4 and Figure 3 of the paper, trained from scratch on a CPU.

    python -m pvc.experiments.toy_ablation --out experiments/results/toy_ablation.json --seeds 3
    python -m pvc.experiments.toy_ablation --quick --out /tmp/quick.json      # a few minutes, the test's run

Small models built from this repository's own `PVCConfig` / `PVCForConditionalGeneration` (nothing of the model is
re-implemented here) learn two synthetic tasks generated on the fly, and are scored on held-out samples:

- image: a 32x32 picture is an 8x8 grid of cells, each one of 4 colours (one cell = one 4x4-pixel patch of the
  ViT). The model answers with the 64 colours in Z order (a fixed readout: no question to route). Score:
  the share of cells right.
- video: a grid that changes: at every frame after the first, each cell is repainted with a random colour with
  probability 1/4. The model answers with the last frame's 64 colours in Z order; which value of a cell is the
  answer depends on the order of the frames. Score: the share of cells right.

Rows (Table 4): (a) InternVL2: 16 tokens per image (2x2 pixel shuffle), seen once; (b) 4 tokens per frame (4x4
pixel shuffle) and the image repeated 4 times, no temporal layers; (c) (b) + progressive layers; PVC: (c) + the
projector's AdaLN (adaptive compression). Figure 3 (right): PVC and (b), trained at 4 repeats as the paper, scored
at 1, 2, 3 and 4. Figure 3 (left): PVC and (b) on the video task at several frame counts, trained at each.
See experiments/README.md for the reasoning behind the sizes and what came out.
"""

import argparse
import contextlib
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
import types
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel

from ..configuration_pvc import PVCConfig
from ..conversion.options import ABLATIONS
from ..conversion.rules import init_seeded
from ..image_processing_pvc import PVCImageProcessor
from ..modeling_pvc import PVCForConditionalGeneration, relative_timestamps
from ..processing_pvc import PVCProcessor, build_chat_template
from ..training.trainer import PVCTrainer, new_parameter_rule, parameter_groups
from .toy_task import (
    FLASH_QUESTION,
    IMAGE_QUESTION,
    SYSTEM_MESSAGE,
    VIDEO_QUESTION,
    BudgetConfig,
    ToyConfig,
    flash_video,
    grid_image,
    repaint_video,
    tiny_tokenizer,
)

# The paper's ablation rows (the converter's table; num_temporal_layers is filled in from the toy size).
ROWS = ABLATIONS
# One-change variants of a row, trained from scratch: (the row, its config overrides).
SCRATCH_VARIANTS = {
    "pvc-te": ("pvc", dict(projector_adaln_condition="timestamp")),  # Table 3: the AdaLN sees TE' alone
    "pvc-wide": ("pvc", dict(projector_adaln_hidden_size=1024)),  # the design's default modulation width, 16C
}


# The quick form (the tests' runs): few steps, and pictures of one cell (one colour, answered by one character), which
# every row learns in these few steps (a pilot: 0.73 of held-out samples right after them, at chance 0.25), so that a
# quick run tells a row that sees the pictures from one that does not (see `blind_ceiling`).
QUICK = dict(
    grid=1,
    steps=20,
    warmup_steps=5,
    eval_samples=32,
    video_frames=(2, 4),
    pretrain_steps=20,
    finetune_steps=10,
    finetune_warmup_steps=2,
)
# Settings of one protocol that do not change a run of the other (left out of the other's run keys, so the first
# report's from-scratch runs, made before these settings existed, still match theirs).
CONVERT_ONLY = (
    "pretrain_steps",
    "finetune_steps",
    "finetune_learning_rate",
    "finetune_new_module_lr_multiplier",
    "finetune_warmup_steps",
)


# ------------------------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------------------------


def build_model(row: str, toy: ToyConfig, seed: int, tokenizer, **overrides) -> PVCForConditionalGeneration:
    """Row `row` of `ROWS` at toy size, with config `overrides` (a variant's one change)."""
    switches = dict(ROWS[row])
    progressive = switches.pop("temporal")
    config = PVCConfig(
        vision_config=dict(
            hidden_size=toy.vision_width,
            num_hidden_layers=toy.vision_layers,
            num_attention_heads=toy.vision_heads,
            intermediate_size=2 * toy.vision_width,
            image_size=toy.image_size,
            patch_size=toy.patch_size,
            num_temporal_layers=toy.temporal_layers if progressive else 0,
            temporal_gate_init=toy.gate_init,
        ),
        text_config=dict(
            model_type="qwen2",
            hidden_size=toy.text_width,
            intermediate_size=4 * toy.text_width,
            num_hidden_layers=toy.text_layers,
            num_attention_heads=toy.text_heads,
            num_key_value_heads=toy.text_heads,
            vocab_size=max(tokenizer.get_vocab().values()) + 1,
            max_position_embeddings=1024,
            tie_word_embeddings=False,
            # generate stops where the chat template ends a turn
            eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_start_token_id=tokenizer.convert_tokens_to_ids("<img>"),
        image_end_token_id=tokenizer.convert_tokens_to_ids("</img>"),
        **{"projector_adaln_hidden_size": toy.projector_adaln_width, **switches, **overrides},
    )
    torch.manual_seed(seed)
    model = PVCForConditionalGeneration(config)
    if toy.paired_init:
        init_by_name(model, seed)
    return model


def init_by_name(model, seed: int):
    """Re-initialise every module from a generator of `seed` and the module's name (the converter's rule for new
    modules), each with the init of the (sub-)model that owns it, so that two rows built with the same seed start
    from the same values for every module they share, whatever else each builds."""

    def visit(module, prefix: str, owner):
        owner = module if isinstance(module, PreTrainedModel) else owner
        for name, child in module.named_children():
            visit(child, f"{prefix}{name}.", owner)
        if any(True for _ in module.parameters(recurse=False)):
            for param in module.parameters(recurse=False):
                param._is_hf_initialized = False
            init_seeded(owner, module, seed, prefix.rstrip("."))

    with torch.no_grad():
        visit(model, "", model)
    model.tie_weights()


def build_processor(model: PVCForConditionalGeneration, toy: ToyConfig, tokenizer=None) -> PVCProcessor:
    """The processor a user of the trained model gets: one tile per image and per frame, a short system turn."""
    return PVCProcessor(
        PVCImageProcessor(image_size=toy.image_size, max_tiles=1, num_frames=max(toy.video_frames)),
        tokenizer if tokenizer is not None else tiny_tokenizer(),
        chat_template=build_chat_template("chatml", system_message=SYSTEM_MESSAGE),
        tokens_per_frame=model.config.tokens_per_frame,
        image_repeat=model.config.image_repeat,
    )


# ------------------------------------------------------------------------------------------------------------------
# Tasks
# ------------------------------------------------------------------------------------------------------------------


class Task:
    """Batches of one task for one model: the prompt as the model's processor writes it, pixels as its image
    processor normalises them, and the loss on the answer's tokens (and the end of the turn)."""

    def __init__(
        self,
        kind: str,
        processor: PVCProcessor,
        toy: ToyConfig,
        num_frames: int | None = None,
        total_frames: int | None = None,
        kept: list[int] | None = None,
        visible: list[int] | None = None,
        flash_cells: int = 1,
    ):
        """`kind`: image, video (repainted grids) or flash (the equal-budget task: videos of `total_frames` frames,
        of which the model sees those in `kept`, default all, and whose flashes show only in `visible`)."""
        self.kind, self.toy, self.num_frames = kind, toy, num_frames
        self.total_frames, self.kept, self.visible, self.flash_cells = total_frames, kept, visible, flash_cells
        self.processor = processor
        sample = self.sample(np.random.default_rng(0))[0]
        media = {"images": [sample]} if kind == "image" else {"videos": [sample], "num_frames": num_frames}
        self.prompt_ids = processor(text=self.prompt(), **media)["input_ids"][0]
        self.end_id = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")

    def prompt(self) -> str:
        item = {"type": "image"} if self.kind == "image" else {"type": "video"}
        question = {"image": IMAGE_QUESTION, "video": VIDEO_QUESTION, "flash": FLASH_QUESTION}[self.kind]
        messages = [{"role": "user", "content": [item, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def sample(self, rng):
        if self.kind == "image":
            return grid_image(self.toy, rng)
        if self.kind == "flash":
            frames, answer = flash_video(self.toy, self.total_frames, rng, self.visible, self.flash_cells)
            return (frames if self.kept is None else frames[self.kept]), answer
        return repaint_video(self.toy, self.num_frames, rng)

    def batch(self, rng: np.random.Generator, size: int) -> dict:
        samples = [self.sample(rng) for _ in range(size)]
        answers = torch.tensor([self.processor.tokenizer.convert_tokens_to_ids(list(a)) for _, a in samples])
        ends = torch.full((size, 1), self.end_id)
        prompt = self.prompt_ids.expand(size, -1)
        input_ids = torch.cat([prompt, answers, ends], dim=1)  # [B, L]
        labels = torch.cat([torch.full_like(prompt, -100), answers, ends], dim=1)
        to_tensor = self.processor.image_processor.to_tensor  # the processor's normalisation
        if self.kind == "image":
            pixels = {
                "pixel_values": to_tensor([picture for picture, _ in samples]),
                "image_num_tiles": torch.ones(size, dtype=torch.long),
            }
        else:
            pixels = {
                "pixel_values_videos": to_tensor([frame for frames, _ in samples for frame in frames]),
                "video_num_frames": torch.full((size,), self.num_frames),
                "video_num_tiles": torch.ones(size, dtype=torch.long),
            }
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels, **pixels}


# ------------------------------------------------------------------------------------------------------------------
# Training and scoring
# ------------------------------------------------------------------------------------------------------------------


def train(model, tasks: list["Task"], toy: ToyConfig, seed: int, log_every: int = 0, log=print, losses_out=None):
    """AdamW, warm-up then cosine decay; PVC's new modules at `new_module_lr_multiplier` x the rate. With several
    tasks, the steps go round them in turn. Each step's loss is appended to `losses_out` (a list) if given."""
    groups = parameter_groups(model, toy.learning_rate, toy.new_module_lr_multiplier, weight_decay=0.01)
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.98))
    base_rates = [group["lr"] for group in optimizer.param_groups]
    rng = np.random.default_rng(seed)
    model.train()
    losses = []
    for step in range(toy.steps):
        progress = max(0.0, (step - toy.warmup_steps) / max(1, toy.steps - toy.warmup_steps))
        factor = min(1.0, (step + 1) / toy.warmup_steps) * 0.5 * (1 + math.cos(math.pi * progress))
        for group, rate in zip(optimizer.param_groups, base_rates):
            group["lr"] = rate * factor
        task = tasks[step % len(tasks)]
        loss = model(**task.batch(rng, toy.batch_size if task.kind == "image" else toy.video_batch_size)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            log(f"step {step + 1}: loss {np.mean(losses[-log_every:]):.3f}")
    if losses_out is not None:
        losses_out.extend(losses)
    return model.eval()


def held_out_rng(seed: int) -> np.random.Generator:
    """The stream of the held-out samples (another stream than training's)."""
    return np.random.default_rng(10**6 + seed)


@torch.no_grad()
def evaluate(model, task: Task, samples: int, seed: int, batch_size: int = 64) -> float:
    """Held-out score (samples drawn from another stream than training's): the share of cells whose colour is the
    model's most likely next token."""
    rng = held_out_rng(seed)
    right, total = 0.0, 0
    model.eval()
    for start in range(0, samples, batch_size):
        batch = task.batch(rng, min(batch_size, samples - start))
        labels = batch.pop("labels")
        predicted = model(**batch).logits[:, :-1].argmax(-1)  # [B, L-1], predicts tokens 1..L-1
        target = labels[:, 1:]
        answer = (target != -100) & (target != task.end_id)  # the answer's own tokens
        right += ((predicted == target) & answer).sum().item() / answer[0].sum().item()
        total += labels.shape[0]
    return right / total


def blind_ceiling(sample, samples: int, seed: int, batch_size: int = 64) -> float:
    """The best score on the samples `evaluate` scores (the same draws; `sample` is a task's `Task.sample`) of any
    model that does not see the pixels, for answers of one character: such a model gets the same prompt for every
    sample, so it gives every sample the same answer, and scores at most the share of the commonest answer. (With
    longer answers a model could also use the earlier characters of the answer: then this bounds only answers that
    ignore them.)"""
    rng = held_out_rng(seed)
    answers = []
    for start in range(0, samples, batch_size):
        answers += [sample(rng)[1] for _ in range(min(batch_size, samples - start))]
    by_position = zip(*answers)
    return float(np.mean([max(np.unique(column, return_counts=True)[1]) / samples for column in by_position]))


def with_repeat(model, toy: ToyConfig, repeat: int) -> Task:
    """The image task for `model` seen as a static clip of `repeat` frames (the model's config is changed)."""
    model.config.image_repeat = repeat
    return Task("image", build_processor(model, toy), toy)


# ------------------------------------------------------------------------------------------------------------------
# What the mechanism does (diagnostics)
# ------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def diagnostics(model, task: Task, samples: int = 64) -> dict:
    """For the image task: how alike the compressed tokens of a static image's frames are, how far the gates
    opened, how much the AdaLN scale/shift differ across frames, and how much temporal attention goes to earlier
    frames."""
    model.eval()
    batch = task.batch(np.random.default_rng(123), samples)
    repeat = model.config.image_repeat
    captured = {"norm": [], "attention": [], "projector": []}
    hooks = [model.model.multi_modal_projector.register_forward_hook(_capture(captured["projector"]))]
    for layer in model.model.vision_tower.encoder.layer:
        if hasattr(layer, "temporal_norm"):
            hooks.append(layer.temporal_norm.register_forward_hook(_capture(captured["norm"])))
            hooks.append(layer.temporal_attention.register_forward_hook(_capture(captured["attention"])))
    try:
        tokens = model.model.encode_clips(batch["pixel_values"], repeat, static=True)  # [S, T, M, D]
    finally:
        for hook in hooks:
            hook.remove()

    flat = torch.nn.functional.normalize(tokens.flatten(2), dim=-1)  # [S, T, M*D]
    similarity = torch.einsum("sti,sui->tu", flat, flat) / flat.shape[0]  # [T, T], mean cosine over images
    off_diagonal = similarity[~torch.eye(repeat, dtype=torch.bool)]
    embeddings = model.get_input_embeddings().weight
    result = {
        "frame_token_cosine": similarity.tolist(),
        "frame_token_cosine_mean_off_diagonal": off_diagonal.mean().item() if repeat > 1 else 1.0,
        # how large the language model's visual inputs are beside its text inputs (it normalises each token)
        "visual_token_rms": tokens.pow(2).mean().sqrt().item(),
        "text_embedding_rms": embeddings.pow(2).mean().sqrt().item(),
        "gate_mean_abs": [],
        "temporal_norm_spread": [],
        "attention_to_earlier_frames": [],
    }
    for layer in model.model.vision_tower.encoder.layer:
        if hasattr(layer, "temporal_gate"):
            result["gate_mean_abs"].append(layer.temporal_gate.weight.abs().mean().item())
    progressive = [layer for layer in model.model.vision_tower.encoder.layer if hasattr(layer, "temporal_norm")]
    for layer, (norm_inputs, _), (attention_inputs, _) in zip(progressive, captured["norm"], captured["attention"]):
        result["temporal_norm_spread"].append(_modulation_spread(layer.temporal_norm, norm_inputs[1], frame_dim=1))
        result["attention_to_earlier_frames"].append(_earlier_frame_mass(layer.temporal_attention, attention_inputs[0]))
    projector = model.model.multi_modal_projector
    if projector.adaptive:
        (vision, _), _ = captured["projector"][0]  # the tower's output, as encode_clips passed it on
        shuffled = projector.pixel_shuffle(vision, repeat)  # [S, T, M, k*k*C]
        condition = projector_condition(projector, shuffled, repeat)  # what the AdaLN saw (a control's own)
        result["projector_adaln_spread"] = _modulation_spread(projector.adaln, condition, frame_dim=1)
        if hasattr(projector, "temporal_embedding"):
            embeds = projector.temporal_embedding(relative_timestamps(repeat))
            result["projector_temporal_embedding_rms"] = embeds.pow(2).mean().sqrt().item()
        result["projector_input_rms"] = shuffled.pow(2).mean().sqrt().item()
    return result


# ------------------------------------------------------------------------------------------------------------------
# Controls of the projector AdaLN's condition (issue 32), applied by the experiment to a loaded model
# ------------------------------------------------------------------------------------------------------------------

# What a control's projector AdaLN is conditioned on (the model's own choices are "input+timestamp", PVC, and
# "timestamp", Table 3's TE' row):
# - "input": x_hat alone, no temporal embedding (the TE' module is removed): a projector of PVC's kind and size whose
#   condition holds no timestamp, so identical frames are normalised alike (row c-wide);
# - "frame-mean": PVC's x_hat + TE', averaged over the clip's frames, so every frame of a clip gets the same
#   condition (row pvc-flat; over a video this looks at later frames, which is not frame-causal: a control only).
PROJECTOR_CONDITIONS = ("input", "frame-mean")


def projector_condition(projector, hidden_states, num_frames: int):
    """The projector AdaLN's condition for pixel-shuffled features [S, T, M, W]: the model's own (x_hat + TE', or
    TE' alone), or a control's (`set_projector_condition`)."""
    mode = getattr(projector, "toy_condition", None)
    if mode == "input":
        return hidden_states
    timestamps = relative_timestamps(num_frames, hidden_states.device)
    embeds = projector.temporal_embedding(timestamps)[None, :, None]  # [1, T, 1, W]
    if mode == "frame-mean":
        return (hidden_states + embeds).mean(dim=1, keepdim=True).expand_as(hidden_states)
    return hidden_states + embeds if projector.condition_on_input else embeds.expand_as(hidden_states)


def _controlled_projector_forward(self, vision_features, num_frames: int):
    """The projector's forward (modeling_pvc.PVCMultiModalProjector.forward, adaptive branch) with the condition
    of `projector_condition`; a test checks that with the model's own condition it gives the model's output."""
    hidden_states = self.pixel_shuffle(vision_features, num_frames)  # [S, T, M, k*k*C]
    hidden_states = self.adaln(hidden_states, projector_condition(self, hidden_states, num_frames))
    return self.linear_2(self.act(self.linear_1(hidden_states)))  # [S, T, M, D]


def set_projector_condition(model, mode: str):
    """Condition the projector AdaLN of a PVC model on `mode` (one of `PROJECTOR_CONDITIONS`), in place."""
    if mode not in PROJECTOR_CONDITIONS:
        raise ValueError(f"mode must be one of {PROJECTOR_CONDITIONS}, got {mode!r}")
    projector = model.model.multi_modal_projector
    if not projector.adaptive:
        raise ValueError("the model's projector has no AdaLN to condition")
    if mode == "input":
        del projector.temporal_embedding  # unused: it would count as capacity the row does not have
    projector.toy_condition = mode
    projector.forward = types.MethodType(_controlled_projector_forward, projector)
    return model


def parameter_budget(model, learning_rate: float, new_module_lr_multiplier: float) -> dict:
    """Parameters of a model ready to train, and how many train at which rate (the trainer's rule: what the
    converter initialised trains at the larger rate), in all and in the projector."""
    is_new = new_parameter_rule(model)
    counts = {"all": 0, "new": 0, "projector": 0, "projector_new": 0}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        new, projector = is_new(name), ".multi_modal_projector." in f".{name}"
        counts["all"] += param.numel()
        counts["new"] += param.numel() * new
        counts["projector"] += param.numel() * projector
        counts["projector_new"] += param.numel() * (new and projector)
    counts["base_rate"] = learning_rate
    counts["new_rate"] = learning_rate * new_module_lr_multiplier
    return counts


def _capture(store: list):
    def hook(module, inputs, output):
        store.append((inputs, output))

    return hook


def _modulation_spread(adaln, condition, frame_dim: int) -> dict:
    """Standard deviation across frames of AdaLN's (1 + scale) and shift, averaged over tokens and channels, beside
    their mean magnitude: zero spread means every frame is normalised the same way."""
    scale, shift = 1 + adaln.scale(condition), adaln.shift(condition)
    return {
        "scale_std_across_frames": scale.std(dim=frame_dim).mean().item(),
        "scale_mean_abs": scale.abs().mean().item(),
        "shift_std_across_frames": shift.std(dim=frame_dim).mean().item(),
        "shift_mean_abs": shift.abs().mean().item(),
    }


def _earlier_frame_mass(attention, normed) -> float:
    """Mean attention weight that frames 2..T give to the frames before them (causal softmax over frames)."""
    sequences, frames, _ = normed.shape  # [(S n), T, C]
    heads = (sequences, frames, attention.num_heads, attention.head_dim)
    query = attention.q_norm(attention.q_proj(normed)).view(heads).transpose(1, 2)  # [Sn, H, T, d]
    key = attention.k_norm(attention.k_proj(normed)).view(heads).transpose(1, 2)
    scores = query @ key.transpose(-1, -2) * attention.scale  # [Sn, H, T, T]
    future = torch.ones(frames, frames, dtype=torch.bool).triu(1)
    weights = scores.masked_fill(future, float("-inf")).softmax(-1)
    earlier = weights.tril(-1).sum(-1)[..., 1:]  # [Sn, H, T-1]: frames 2..T
    return earlier.mean().item()


# ------------------------------------------------------------------------------------------------------------------
# The convert protocol: the user's path
# ------------------------------------------------------------------------------------------------------------------

# Rows of the convert protocol: the `pvc-convert --ablation` row each comes from, and what else differs (one change
# each against the row named in `against`). `load` overrides config settings when the converted model is loaded;
# `repeats: "drawn"` trains with the image repeat drawn per batch from 1..4 (Figure 3 without the layout confound).
CONVERT_ROWS = {
    "a": dict(ablation="a"),
    "b": dict(ablation="b"),
    "c": dict(ablation="c"),
    "pvc": dict(ablation="pvc"),
    "pvc-te": dict(ablation="pvc", load=dict(projector_adaln_condition="timestamp"), against="pvc"),
    "b-drawn": dict(ablation="b", repeats="drawn", against="b"),
    "pvc-drawn": dict(ablation="pvc", repeats="drawn", against="pvc"),
    # Controls of the image result (issue 32). c-wide: (c) with a projector of PVC's kind, size and learning rates
    # but a condition without a timestamp (x_hat alone; the modulation width 1344 instead of 1024 makes up for the
    # removed TE', so that its parameters match PVC's to 0.03%). pvc-flat: PVC with a condition that is the same for
    # every frame of a clip (x_hat + TE' averaged over the frames).
    "c-wide": dict(ablation="pvc", convert=["--projector-adaln-hidden-size", "1344"], condition="input", against="c"),
    "pvc-flat": dict(ablation="pvc", condition="frame-mean", against="pvc"),
}


def convert_tasks(processor, toy: ToyConfig) -> list["Task"]:
    """The convert protocol's data: image and video batches in turn, the video's frame count going round 2, 3, 4."""
    image = Task("image", processor, toy)
    videos = [Task("video", processor, toy, num_frames=frames) for frames in toy.video_frames]
    return [task for video in videos for task in (image, video)]


def made_once(checkpoint: Path, make) -> Path:
    """`checkpoint`, trained and saved by `make()` -> (model, processor, scores) unless it is there: once per
    folder, as parallel runs wait on a lock, and never half-written (saved beside it, then renamed into place)."""
    import fcntl

    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    with open(checkpoint.parent / f"{checkpoint.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (checkpoint / "toy_scores.json").exists():
            return checkpoint
        started = time.perf_counter()
        model, processor, scores = make()
        staging = checkpoint.with_name(checkpoint.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        scores["seconds"] = round(time.perf_counter() - started, 1)
        (staging / "toy_scores.json").write_text(json.dumps(scores))
        shutil.rmtree(checkpoint, ignore_errors=True)
        staging.replace(checkpoint)
    return checkpoint


def pretrained_row_a(folder: Path, toy: ToyConfig, seed: int) -> Path:
    """Row (a), InternVL2 at toy size, trained from scratch on both tasks and saved with `save_pretrained` (model,
    tokenizer, processor): the checkpoint a user would convert. Made once per seed; parallel runs wait for it."""

    def make():
        tokenizer = tiny_tokenizer()
        model = build_model("a", toy, seed, tokenizer)
        processor = build_processor(model, toy, tokenizer)
        train(model, convert_tasks(processor, toy), replace(toy, steps=toy.pretrain_steps), seed)
        return model, processor, score_both(model, processor, toy, seed)

    return made_once(folder / f"seed{seed}" / "a-pretrained", make)


def score_both(model, processor, toy: ToyConfig, seed: int) -> dict:
    """Held-out image score and video score per frame count."""
    scores = {"image": evaluate(model, Task("image", processor, toy), toy.eval_samples, seed)}
    scores["video"] = {
        str(frames): evaluate(model, Task("video", processor, toy, num_frames=frames), toy.eval_samples, seed)
        for frames in toy.video_frames
    }
    return scores


class ToyStream(torch.utils.data.IterableDataset):
    """The training batches of `convert_tasks`, one whole batch per item, from the seed's own stream (the same for
    every row). With `drawn_repeats`, each image batch comes with an image repeat drawn from 1..4."""

    def __init__(self, tasks: list["Task"], toy: ToyConfig, seed: int, drawn_repeats: dict | None = None):
        self.tasks, self.toy, self.seed, self.drawn_repeats = tasks, toy, seed, drawn_repeats

    def __iter__(self):
        rng = np.random.default_rng(10**5 + self.seed)
        for step in range(self.toy.finetune_steps * 4):  # more than the steps; the Trainer stops at max_steps
            task = self.tasks[step % len(self.tasks)]
            extra = {}
            if task.kind == "image" and self.drawn_repeats:
                repeat = int(rng.integers(1, 5))
                task, extra = self.drawn_repeats[repeat], {"image_repeat": repeat}
            size = self.toy.batch_size if task.kind == "image" else self.toy.video_batch_size
            yield {**task.batch(rng, size), **extra}


class ToyTrainer(PVCTrainer):
    """The repo's trainer; a batch may carry the image repeat its prompt was written for (drawn repeats)."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        repeat = inputs.pop("image_repeat", None)
        if repeat is not None:
            model.config.image_repeat = int(repeat)
        return super().compute_loss(model, inputs, *args, **kwargs)


def finetune(model, stream: ToyStream, toy: ToyConfig, seed: int, folder: Path, log_every: int | None = None):
    """Fine-tune with `PVCTrainer` and the paper's recipe: all parameters, what the converter initialised (the
    config's `new_parameters`) at 10x the rate; AdamW, warm-up then cosine decay, clipping at 1, as the from-scratch
    loop."""
    from transformers import TrainingArguments

    args = TrainingArguments(
        output_dir=str(folder),
        max_steps=toy.finetune_steps,
        per_device_train_batch_size=1,  # one item is one whole batch
        learning_rate=toy.finetune_learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=toy.finetune_warmup_steps,
        weight_decay=0.01,
        adam_beta2=0.98,
        max_grad_norm=1.0,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        # an iterable dataset is otherwise dispatched, and each tensor cut to the first one's batch size
        accelerator_config={"dispatch_batches": False},
        remove_unused_columns=False,  # keeps a batch's image_repeat
        seed=seed,
        disable_tqdm=True,
        log_level="warning",
        logging_steps=log_every or max(1, toy.finetune_steps // 8),
    )
    trainer = ToyTrainer(
        model=model,
        args=args,
        train_dataset=stream,
        data_collator=lambda items: items[0],
        new_module_lr_multiplier=toy.finetune_new_module_lr_multiplier,
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return model.eval(), losses


def load_converted_row(source: Path, destination: Path, row: str, seed: int, toy: ToyConfig, rows=None):
    """Convert row (a)'s checkpoint `source` into row `row` of `rows` (default `CONVERT_ROWS`) with `pvc-convert`
    (into `destination`) and load it, with the row's load-time settings and projector condition."""
    from ..conversion.cli import main as pvc_convert

    spec = (rows or CONVERT_ROWS)[row]
    command = ["--src", str(source), "--dst", str(destination), "--ablation", spec["ablation"], "--seed", str(seed)]
    command += ["--num-temporal-layers", str(toy.temporal_layers), "--overwrite", *spec.get("convert", [])]
    with contextlib.redirect_stdout(io.StringIO()):
        code = pvc_convert(command)
    if code:
        raise RuntimeError(f"pvc-convert {' '.join(command)} failed with exit code {code}")
    model = PVCForConditionalGeneration.from_pretrained(destination, dtype=torch.float32, **spec.get("load", {}))
    if "condition" in spec:
        set_projector_condition(model, spec["condition"])
    return model


def row_parameter_budget(row: str, toy: ToyConfig, rows=None) -> dict:
    """`parameter_budget` of a convert-protocol row as its runs start (for runs logged before they recorded it):
    an untrained row (a) at toy size, converted and loaded as a run does; the counts do not depend on the weights."""
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = tiny_tokenizer()
        model = build_model("a", toy, 0, tokenizer)
        source = Path(scratch) / "a"
        model.save_pretrained(source)
        build_processor(model, toy, tokenizer).save_pretrained(source)
        converted = load_converted_row(source, Path(scratch) / f"{row}-converted", row, 0, toy, rows)
        return parameter_budget(converted, toy.finetune_learning_rate, toy.finetune_new_module_lr_multiplier)


def run_convert_job(job: dict) -> dict:
    """The user's path for one row and seed: convert the seed's trained row (a) with `pvc-convert` (the row's
    --ablation, a seed of its own for the new modules, so every row starts from the same values for what it
    shares), load it, fine-tune with `PVCTrainer`, and score both tasks on held-out samples."""
    torch.set_num_threads(1)
    toy, row, seed = ToyConfig(**job["toy"]), job["row"], job["seed"]
    spec = CONVERT_ROWS[row]
    started = time.perf_counter()
    folder = Path(job["work"])
    source = pretrained_row_a(folder, toy, seed)
    destination = folder / f"seed{seed}" / f"{row}-converted"
    model = load_converted_row(source, destination, row, seed, toy)
    tokenizer = tiny_tokenizer()
    processor = build_processor(model, toy, tokenizer)
    drawn = None
    if spec.get("repeats") == "drawn":
        drawn = {repeat: with_repeat(model, toy, repeat) for repeat in toy.repeats}
        model.config.image_repeat = 4
    stream = ToyStream(convert_tasks(processor, toy), toy, seed, drawn)
    budget = parameter_budget(model, toy.finetune_learning_rate, toy.finetune_new_module_lr_multiplier)
    with tempfile.TemporaryDirectory() as scratch:
        model, losses = finetune(model, stream, toy, seed, Path(scratch))
    model.config.image_repeat = ROWS[spec["ablation"]]["image_repeat"]
    result = {"protocol": "convert", "row": row, "seed": seed, "losses": losses, "parameters": budget}
    result.update(score_both(model, processor, toy, seed))
    result["pretrained"] = json.loads((source / "toy_scores.json").read_text())
    if spec["ablation"] != "a":
        image_task = Task("image", processor, toy)
        result["diagnostics"] = diagnostics(model, image_task)
        result["repeats"] = {
            str(r): evaluate(model, with_repeat(model, toy, r), toy.eval_samples, seed) for r in toy.repeats
        }
        model.config.image_repeat = ROWS[spec["ablation"]]["image_repeat"]
    result["seconds"] = round(time.perf_counter() - started, 1)
    shutil.rmtree(destination, ignore_errors=True)  # the converted start; the pretrained source stays
    print(f"  {json.dumps({k: v for k, v in result.items() if k not in ('diagnostics', 'losses')})}", flush=True)
    return result


# ------------------------------------------------------------------------------------------------------------------
# The equal-token-budget video task (issue 32): rows at the same number of visual tokens
# ------------------------------------------------------------------------------------------------------------------

# Rows: (a) at T/4 frames (16 tokens each) and (b), (c), PVC at T frames (4 tokens each): the same visual tokens;
# (a) at T frames, 4x the tokens, is the ceiling. `frames: "kept"` marks the row that sees T/4 of the frames.
BUDGET_ROWS = {
    "a-kept": dict(ablation="a", frames="kept"),
    "b": dict(ablation="b"),
    "c": dict(ablation="c"),
    "pvc": dict(ablation="pvc"),
    "a": dict(ablation="a"),
}
QUICK_BUDGET = dict(pretrain_steps=20, finetune_steps=10, log_every=2, flash_cells=1)  # the quick pictures: 1 cell


def flash_tasks(processor, toy: ToyConfig, budget: BudgetConfig, frames: str = "all", visible=None) -> "Task":
    """The flash task as a row sees it: all T frames, or the T/4 kept ones (`frames="kept"`)."""
    kept = budget.kept() if frames == "kept" else None
    seen = budget.kept_frames if frames == "kept" else budget.frames
    return Task(
        "flash",
        processor,
        toy,
        seen,
        total_frames=budget.frames,
        kept=kept,
        visible=visible,
        flash_cells=budget.flash_cells,
    )


def uniform_plateau(budget: BudgetConfig) -> float:
    """The training loss of a model that knows the answer's form but not the colours: ln 4 on each of the T colour
    tokens, nothing on the end of the turn (the loss is the mean over those T + 1 tokens)."""
    return budget.frames * math.log(4) / (budget.frames + 1)


@torch.no_grad()
def evaluate_positions(model, task: Task, samples: int, seed: int, batch_size: int = 64) -> list[float]:
    """`evaluate` per answer position: for the flash task, the share right of each frame's flash."""
    rng = held_out_rng(seed)
    right, total = None, 0
    model.eval()
    for start in range(0, samples, batch_size):
        batch = task.batch(rng, min(batch_size, samples - start))
        labels = batch.pop("labels")
        predicted = model(**batch).logits[:, :-1].argmax(-1)
        target = labels[:, 1:]
        answer = (target != -100) & (target != task.end_id)
        hits = ((predicted == target) & answer).float().sum(0)[answer[0]]  # [answer length]
        right = hits if right is None else right + hits
        total += labels.shape[0]
    return (right / total).tolist()


def budget_scores(model, processor, toy: ToyConfig, budget: BudgetConfig, frames: str, seed: int) -> dict:
    """Held-out flash scores of a model seeing `frames` ("all" or "kept"): the share of flashes right, per frame,
    and, seeing all T frames, with the flashes shown only in the kept frames (how much the answer needs the rest)."""
    positions = evaluate_positions(model, flash_tasks(processor, toy, budget, frames), toy.eval_samples, seed)
    scores = {"score": float(np.mean(positions)), "by_frame": positions}
    if frames == "all":
        masked = flash_tasks(processor, toy, budget, "all", visible=budget.kept())
        scores["flashes_only_in_kept_frames"] = float(
            np.mean(evaluate_positions(model, masked, toy.eval_samples, seed))
        )
    return scores


def pretrained_flash_a(folder: Path, toy: ToyConfig, budget: BudgetConfig, seed: int) -> Path:
    """Row (a) trained from scratch on the flash task (batches of T frames and of the T/4 kept frames in turn) and
    saved: the checkpoint every row of the seed is converted from. Made once per seed."""

    def make():
        tokenizer = tiny_tokenizer()
        model = build_model("a", toy, seed, tokenizer)
        processor = build_processor(model, toy, tokenizer)
        tasks = [flash_tasks(processor, toy, budget, "all"), flash_tasks(processor, toy, budget, "kept")]
        losses = []
        train(model, tasks, replace(toy, steps=budget.pretrain_steps), seed, losses_out=losses)
        every = budget.log_every
        scores = {frames: budget_scores(model, processor, toy, budget, frames, seed) for frames in ("all", "kept")}
        # the steps go round T and T/4 frames in turn: the curve of each, averaged over `every` of its steps
        scores["losses"] = {
            frames: [float(np.mean(losses[start::2][i : i + every])) for i in range(0, len(losses[start::2]), every)]
            for start, frames in ((0, "all"), (1, "kept"))
        }
        return model, processor, scores

    return made_once(folder / f"seed{seed}" / "a-flash-pretrained", make)


def run_budget_job(job: dict) -> dict:
    """One row and seed of the equal-budget task: the seed's row (a) converted to the row, fine-tuned with
    `PVCTrainer` (the convert protocol's recipe) on flash videos at the row's frame count, scored on held-out ones."""
    torch.set_num_threads(1)
    toy, budget, row, seed = ToyConfig(**job["toy"]), BudgetConfig(**job["budget"]), job["row"], job["seed"]
    spec = BUDGET_ROWS[row]
    started = time.perf_counter()
    folder = Path(job["work"])
    source = pretrained_flash_a(folder, toy, budget, seed)
    destination = folder / f"seed{seed}" / f"{row}-converted"
    model = load_converted_row(source, destination, row, seed, toy, BUDGET_ROWS)
    processor = build_processor(model, toy, tiny_tokenizer())
    frames = spec.get("frames", "all")
    tuning = replace(toy, finetune_steps=budget.finetune_steps)
    stream = ToyStream([flash_tasks(processor, toy, budget, frames)], tuning, seed)
    parameters = parameter_budget(model, toy.finetune_learning_rate, toy.finetune_new_module_lr_multiplier)
    with tempfile.TemporaryDirectory() as scratch:
        model, losses = finetune(model, stream, tuning, seed, Path(scratch), log_every=budget.log_every)
    seen = budget.kept_frames if frames == "kept" else budget.frames
    result = {
        "protocol": "budget",
        "row": row,
        "seed": seed,
        "frames_seen": seen,
        "visual_tokens": seen * model.config.tokens_per_frame,
        "losses": losses,
        "parameters": parameters,
        **budget_scores(model, processor, toy, budget, frames, seed),
        "pretrained": json.loads((source / "toy_scores.json").read_text()),
        "seconds": round(time.perf_counter() - started, 1),
    }
    shutil.rmtree(destination, ignore_errors=True)
    print(f"  {json.dumps({k: v for k, v in result.items() if k not in ('losses', 'pretrained')})}", flush=True)
    return result


def collect_budget(results: list[dict], toy: ToyConfig, budget: BudgetConfig, argv) -> dict:
    """The equal-budget report: per row, the score (mean, std, runs in seed order), per frame, with the flashes only
    in the kept frames, the loss curve (mean over seeds), visual tokens and parameters; row (a) before fine-tuning."""
    report = {"protocol": "budget", "budget": asdict(budget), "uniform_plateau": uniform_plateau(budget), "rows": {}}
    report["kept_frames"] = budget.kept()
    for row in BUDGET_ROWS:
        runs = sorted((r for r in results if r["row"] == row), key=lambda r: r["seed"])
        if not runs:
            continue
        entry = {
            "seeds": [r["seed"] for r in runs],
            "frames_seen": runs[0]["frames_seen"],
            "visual_tokens": runs[0]["visual_tokens"],
            "parameters": runs[0]["parameters"],
            "score": summary([r["score"] for r in runs]),
            "by_frame": np.mean([r["by_frame"] for r in runs], axis=0).tolist(),
            "losses": np.mean([r["losses"] for r in runs], axis=0).tolist(),
            "final_loss": summary([r["losses"][-1] for r in runs]),
        }
        if "flashes_only_in_kept_frames" in runs[0]:
            entry["flashes_only_in_kept_frames"] = summary([r["flashes_only_in_kept_frames"] for r in runs])
        report["rows"][row] = entry
    pretrained = {r["seed"]: r["pretrained"] for r in results}
    if pretrained:
        seeds = sorted(pretrained)
        report["pretrained"] = {
            "seeds": seeds,
            **{frames: summary([pretrained[s][frames]["score"] for s in seeds]) for frames in ("all", "kept")},
            "flashes_only_in_kept_frames": summary(
                [pretrained[s]["all"]["flashes_only_in_kept_frames"] for s in seeds]
            ),
            "losses": {
                frames: np.mean([pretrained[s]["losses"][frames] for s in seeds], axis=0).tolist()
                for frames in ("all", "kept")
            },
            "seconds": [pretrained[s]["seconds"] for s in seeds],
        }
    report["config"] = run_config(toy, BUDGET_ROWS, argv, results, lambda r: f"{r['row']}/seed{r['seed']}")
    return report


def table_budget(report: dict) -> str:
    """The equal-budget report as Markdown: scores at equal visual tokens, then the loss curves."""
    plateau = report["uniform_plateau"]
    lines = [
        "| row | frames seen x tokens each = visual tokens | flashes right (mean +- std) | per seed | per frame "
        "(mean over seeds) | flashes only in the kept frames | parameters: all / at 10x the rate |",
        "|---|---|---|---|---|---|---|",
    ]
    start = report.get("pretrained")
    if start:
        lines.append(
            f"| (a) before fine-tuning, T frames / T/4 frames | - | {_cell(start['all'])} / {_cell(start['kept'])} "
            f"| - | - | {_cell(start['flashes_only_in_kept_frames'])} | - |"
        )
    for row, values in report["rows"].items():
        per_frame = ", ".join(f"{v:.2f}" for v in values["by_frame"])
        masked = values.get("flashes_only_in_kept_frames")
        tokens = values["visual_tokens"] // values["frames_seen"]
        counts = values["parameters"]
        lines.append(
            f"| {row} | {values['frames_seen']} x {tokens} = {values['visual_tokens']} | {_cell(values['score'])} | "
            + ", ".join(f"{run:.3f}" for run in values["score"]["runs"])
            + f" | {per_frame} | {_cell(masked) if masked else '-'} | {counts['all']:,} / {counts['new']:,} |"
        )
    curves = {row: values["losses"] for row, values in report["rows"].items()}
    if curves:
        every = report["budget"]["log_every"]
        points = max(len(curve) for curve in curves.values())
        picks = sorted({0, 1, 3, points // 4, points // 2, points - 1} & set(range(points)))
        lines += [
            "",
            f"Fine-tuning loss (mean over seeds; the uniform plateau, every colour at 1/4, is {plateau:.3f}):",
            "",
            "| row \\ step | " + " | ".join(str((p + 1) * every) for p in picks) + " |",
            "|---|" + "---|" * len(picks),
        ]
        for row, curve in curves.items():
            lines.append(f"| {row} | " + " | ".join(f"{curve[p]:.3f}" if p < len(curve) else "-" for p in picks) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------------
# Runs
# ------------------------------------------------------------------------------------------------------------------


def run_job(job: dict) -> dict:
    """Train one model on one task with one seed and score it; a job is a dict so that it pickles to a worker."""
    if job.get("protocol") == "convert":
        return run_convert_job(job)
    if job.get("protocol") == "budget":
        return run_budget_job(job)
    torch.set_num_threads(1)
    toy, row, seed = ToyConfig(**job["toy"]), job["row"], job["seed"]
    started = time.perf_counter()
    tokenizer = tiny_tokenizer()
    base_row, overrides = SCRATCH_VARIANTS.get(row, (row, {}))
    model = build_model(base_row, toy, seed, tokenizer, **overrides)
    result = {"task": job["task"], "row": row, "seed": seed}
    if job["task"] == "image":
        task = Task("image", build_processor(model, toy, tokenizer), toy)
        train(model, [task], toy, seed)
        result["accuracy"] = evaluate(model, task, toy.eval_samples, seed)
        if base_row in ("b", "c", "pvc"):
            result["diagnostics"] = diagnostics(model, task)
            trained_repeat = model.config.image_repeat
            result["repeats"] = {
                str(r): evaluate(model, with_repeat(model, toy, r), toy.eval_samples, seed) for r in toy.repeats
            }
            model.config.image_repeat = trained_repeat
    else:
        task = Task("video", build_processor(model, toy, tokenizer), toy, num_frames=job["frames"])
        train(model, [task], toy, seed)
        result["frames"] = job["frames"]
        result["accuracy"] = evaluate(model, task, toy.eval_samples, seed)
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(f"  {json.dumps({k: v for k, v in result.items() if k != 'diagnostics'})}", flush=True)
    return result


def jobs_for(
    toy: ToyConfig, rows, seeds, tasks, protocol: str = "scratch", work: Path | None = None, budget=None
) -> list[dict]:
    if protocol == "budget":  # seed by seed: a seed's row (a) is trained by its first run
        jobs = [dict(protocol="budget", task="budget", row=row, seed=seed) for seed in seeds for row in rows]
        return [dict(job, toy=asdict(toy), budget=asdict(budget), work=str(work)) for job in jobs]
    if protocol == "convert":  # row by row, so that the seeds' row (a) checkpoints are trained side by side first
        jobs = [dict(protocol="convert", task="both", row=row, seed=seed) for row in rows for seed in seeds]
        return [dict(job, toy=asdict(toy), work=str(work)) for job in jobs]
    jobs = []
    if "image" in tasks:
        jobs += [dict(task="image", row=row, seed=seed) for seed in seeds for row in rows]
    if "video" in tasks:
        video_rows = [row for row in ("b", "pvc") if row in rows]  # Figure 3 (left)
        jobs += [
            dict(task="video", row=row, seed=seed, frames=frames)
            for seed in seeds
            for frames in toy.video_frames
            for row in video_rows
        ]
    return [dict(job, toy=asdict(toy)) for job in jobs]


# Settings that do not change a run of the other task (so changing them does not redo it).
IRRELEVANT = {
    "image": ("video_frames", "video_batch_size", "repaint", *CONVERT_ONLY),
    "video": ("repeats", "batch_size", "video_frames", *CONVERT_ONLY),
    "both": (),
    "budget": ("repeats", "video_frames", "batch_size", "repaint", "steps", "pretrain_steps", "finetune_steps"),
}


def _job_key(job: dict) -> str:
    toy = {k: v for k, v in job["toy"].items() if k not in IRRELEVANT[job["task"]]}
    if not toy.get("paired_init", False):  # the first report's runs, made before paired init existed
        toy.pop("paired_init", None)
    return json.dumps(dict({k: v for k, v in job.items() if k != "work"}, toy=toy), sort_keys=True)


def _run_all(jobs: list[dict], workers: int):
    """(job, result) pairs as runs finish, on `workers` single-threaded processes."""
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield job, run_job(job)
        return
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from zip(jobs, pool.imap(run_job, jobs, chunksize=1))


def summary(values) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "runs": [float(v) for v in values]}


def collect(results: list[dict], toy: ToyConfig, argv, budget=None) -> dict:
    if results and results[0].get("protocol") == "budget":
        return collect_budget(results, toy, budget, argv)
    if results and results[0].get("protocol") == "convert":
        return collect_convert(results, toy, argv)
    image = [r for r in results if r["task"] == "image"]
    video = [r for r in results if r["task"] == "video"]
    report = {"protocol": "scratch", "rows": {}, "repeats": {}, "video": {}, "diagnostics": {}}
    for row in [*ROWS, *SCRATCH_VARIANTS]:
        runs = [r for r in image if r["row"] == row]
        if runs:
            report["rows"][row] = summary([r["accuracy"] for r in runs])
        if runs and "repeats" in runs[0]:
            report["repeats"][row] = {k: summary([r["repeats"][k] for r in runs]) for k in runs[0]["repeats"]}
            report["diagnostics"][row] = [r["diagnostics"] for r in runs]
        frames = sorted({r["frames"] for r in video if r["row"] == row})
        if frames:
            report["video"][row] = {
                str(f): summary([r["accuracy"] for r in video if r["row"] == row and r["frames"] == f]) for f in frames
            }
    report["config"] = run_config(toy, ROWS, argv, results, lambda r: f"{r['task']}/{r['row']}")
    return report


def run_config(toy: ToyConfig, rows: dict, argv, results: list[dict], name) -> dict:
    """What a report was made with: the sizes, the rows, the command, torch, and each run's seconds (by `name`)."""
    return {
        "toy": asdict(toy),
        "rows": rows,
        "command": "python -m pvc.experiments.toy_ablation " + " ".join(argv),
        "torch": torch.__version__,
        "seconds_per_run": {name(r): r["seconds"] for r in results},
        # in the convert protocol a seed's first run also trained its row (a): its seconds hold that training
        "process_seconds": round(sum(r["seconds"] for r in results), 1),
    }


def collect_convert(results: list[dict], toy: ToyConfig, argv) -> dict:
    """The convert protocol's report: per row, the image score and the video score per frame count (mean, std and
    the runs in seed order), the image score at each repeat, the diagnostics, and row (a) before fine-tuning."""
    report = {"protocol": "convert", "rows": {}, "repeats": {}, "diagnostics": {}, "pretrained": {}}
    for row in CONVERT_ROWS:
        runs = sorted((r for r in results if r["row"] == row), key=lambda r: r["seed"])
        if not runs:
            continue
        report["rows"][row] = {
            "seeds": [r["seed"] for r in runs],
            "image": summary([r["image"] for r in runs]),
            "video": {f: summary([r["video"][f] for r in runs]) for f in runs[0]["video"]},
            "final_loss": summary([r["losses"][-1] for r in runs if r["losses"]] or [float("nan")]),
        }
        if "parameters" in runs[0]:  # counted as the run started (runs logged before this have none)
            report["rows"][row]["parameters"] = runs[0]["parameters"]
        if "repeats" in runs[0]:
            report["repeats"][row] = {k: summary([r["repeats"][k] for r in runs]) for k in runs[0]["repeats"]}
            report["diagnostics"][row] = [r["diagnostics"] for r in runs]
    pretrained = {r["seed"]: r["pretrained"] for r in results}
    if pretrained:
        seeds = sorted(pretrained)
        report["pretrained"] = {
            "seeds": seeds,
            "image": summary([pretrained[s]["image"] for s in seeds]),
            "video": {f: summary([pretrained[s]["video"][f] for s in seeds]) for f in pretrained[seeds[0]]["video"]},
            "seconds": [pretrained[s]["seconds"] for s in seeds],
        }
    report["config"] = run_config(toy, CONVERT_ROWS, argv, results, lambda r: f"{r['row']}/seed{r['seed']}")
    return report


PAPER_DIRECTION = {
    "a": "the reference: most tokens per frame",
    "b": "below (a) on detail",
    "c": "recovers most of the gap to (a)",
    "pvc": "at least (c)",
}


def _cell(values: dict) -> str:
    return f"{values['mean']:.3f} +- {values['std']:.3f}"


def table(report: dict) -> str:
    """The report as Markdown: Table 4's rows, Figure 3's two curves, and the diagnostics (means over seeds)."""
    if report.get("protocol") == "convert":
        return table_convert(report)
    if report.get("protocol") == "budget":
        return table_budget(report)
    lines = [
        "| row | image: share of cells right (mean +- std) | per seed | the paper's direction |",
        "|---|---|---|---|",
    ]
    for row, values in report["rows"].items():
        runs = ", ".join(f"{run:.3f}" for run in values["runs"])
        direction = PAPER_DIRECTION.get(row) or f"one change against {SCRATCH_VARIANTS[row][0]}"
        lines.append(f"| {row} | {_cell(values)} | {runs} | {direction} |")
    for title, section in (("image repeats at test time", "repeats"), ("video frames", "video")):
        if not report[section]:
            continue
        keys = sorted({key for values in report[section].values() for key in values}, key=int)
        lines += ["", f"| row \\ {title} | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for row, values in report[section].items():
            cells = [f"{values[k]['mean']:.3f} +- {values[k]['std']:.3f}" if k in values else "-" for k in keys]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines + diagnostics_table(report["diagnostics"]))


def table_convert(report: dict) -> str:
    """The convert protocol as Markdown: Table 4 (image and video), Table 3, Figure 3 (right) with repeats at 4
    and drawn, and the diagnostics."""
    rows = report["rows"]
    frames = sorted({f for values in rows.values() for f in values["video"]}, key=int)
    lines = [
        "| row | image (mean +- std) | image per seed | " + " | ".join(f"video, {f} frames" for f in frames) + " |",
        "|---|---|---|" + "---|" * len(frames),
    ]
    if report["pretrained"]:
        start = report["pretrained"]
        cells = [_cell(start["video"][f]) if f in start["video"] else "-" for f in frames]
        runs = ", ".join(f"{run:.3f}" for run in start["image"]["runs"])
        lines.append(f"| (a) before fine-tuning | {_cell(start['image'])} | {runs} | " + " | ".join(cells) + " |")
    for row, values in rows.items():
        cells = [_cell(values["video"][f]) if f in values["video"] else "-" for f in frames]
        runs = ", ".join(f"{run:.3f}" for run in values["image"]["runs"])
        lines.append(f"| {row} | {_cell(values['image'])} | {runs} | " + " | ".join(cells) + " |")
    if report["repeats"]:
        keys = sorted({key for values in report["repeats"].values() for key in values}, key=int)
        lines += ["", "| row \\ image repeats at test time | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for row, values in report["repeats"].items():
            lines.append(f"| {row} | " + " | ".join(_cell(values[k]) if k in values else "-" for k in keys) + " |")
    return "\n".join(lines + diagnostics_table(report["diagnostics"]))


def diagnostics_table(diagnostics: dict) -> list[str]:
    lines = []
    if diagnostics:
        lines += [
            "",
            "| row | frame-token cosine (off-diagonal) | gate mean abs per layer | attention to earlier frames per layer "
            "| projector AdaLN (1 + scale): spread across frames / size | visual token RMS / text embedding RMS |",
            "|---|---|---|---|---|---|",
        ]
        for row, runs in diagnostics.items():
            cosine = np.mean([run["frame_token_cosine_mean_off_diagonal"] for run in runs])
            gates = _layer_means(runs, "gate_mean_abs")
            attention = _layer_means(runs, "attention_to_earlier_frames")
            spread = "-"
            if all("projector_adaln_spread" in run for run in runs):
                spread = " / ".join(
                    f"{np.mean([run['projector_adaln_spread'][key] for run in runs]):.3g}"
                    for key in ("scale_std_across_frames", "scale_mean_abs")
                )
            sizes = "-"
            if all("visual_token_rms" in run for run in runs):
                visual, text = (
                    np.mean([run[key] for run in runs]) for key in ("visual_token_rms", "text_embedding_rms")
                )
                sizes = f"{visual:.3g} / {text:.3g}"
            lines.append(f"| {row} | {cosine:.3f} | {gates} | {attention} | {spread} | {sizes} |")
    return lines


def _layer_means(runs: list[dict], key: str) -> str:
    values = [run[key] for run in runs if run[key]]
    return ", ".join(f"{value:.3f}" for value in np.mean(values, axis=0)) if values else "-"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the JSON report to write")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--seeds", type=int, default=3, help="how many seeds (seed, seed + 1, ...)")
    parser.add_argument(
        "--protocol",
        choices=["scratch", "convert", "budget"],
        default="scratch",
        help="scratch (default): every row trained from scratch; convert: the user's path, row (a) trained, then "
        "converted with pvc-convert and fine-tuned with PVCTrainer; budget: the equal-token-budget video task, "
        "by the convert path",
    )
    parser.add_argument(
        "--rows",
        default=None,
        help=f"rows to train; scratch: {', '.join([*ROWS, *SCRATCH_VARIANTS])} (default a,b,c,pvc); convert: "
        f"{', '.join(CONVERT_ROWS)} (default all); budget: {', '.join(BUDGET_ROWS)} (default all)",
    )
    parser.add_argument(
        "--unpaired-init", action="store_true", help="scratch: initialise as the first report did (rows not paired)"
    )
    parser.add_argument("--repeats", default="1,2,3,4", help="image repeats scored for b, c and PVC")
    parser.add_argument("--frames", default=None, help="video frame counts (default 2,3,4; quick 2,4)")
    parser.add_argument("--task", choices=["image", "video", "all"], default="all")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 1500)")
    parser.add_argument("--gate-init", type=float, default=0.0, help="initial value of the temporal gates")
    parser.add_argument(
        "--new-module-lr-multiplier", type=float, default=1.0, help="learning-rate factor of PVC's modules (paper: 10)"
    )
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="processes, 1 thread each")
    parser.add_argument("--quick", action="store_true", help="a few minutes: few steps, 1 seed, few samples")
    parser.add_argument("--plot", action="store_true", help="also write Figure-3-style PNGs beside --out")
    parser.add_argument(
        "--collect-only", action="store_true", help="write the report from the finished runs only (it lists the rest)"
    )
    args = parser.parse_args(argv)

    known = {"convert": list(CONVERT_ROWS), "budget": list(BUDGET_ROWS)}.get(args.protocol, [*ROWS, *SCRATCH_VARIANTS])
    default_rows = ",".join(known) if args.protocol in ("convert", "budget") else "a,b,c,pvc"
    rows = [row.strip() for row in (args.rows or default_rows).split(",") if row.strip()]
    unknown = sorted(set(rows) - set(known))
    if unknown or not rows:
        parser.error(f"--rows takes a comma-separated list of {', '.join(known)}; got {args.rows!r}.")
    toy = ToyConfig(
        repeats=tuple(int(r) for r in args.repeats.split(",")),
        gate_init=args.gate_init,
        new_module_lr_multiplier=args.new_module_lr_multiplier,
        paired_init=not args.unpaired_init,
    )
    if args.quick:
        toy = replace(toy, **QUICK)
    if args.frames:
        toy = replace(toy, video_frames=tuple(int(f) for f in args.frames.split(",")))
    if args.steps:
        toy = replace(toy, steps=args.steps)
    if min(toy.repeats) < 1 or min(toy.video_frames) < 1:
        parser.error("repeats and video frame counts must be at least 1.")
    seeds = [args.seed] if args.quick else list(range(args.seed, args.seed + args.seeds))
    tasks = ["image", "video"] if args.task == "all" else [args.task]
    work = args.out.with_name(args.out.name + ".work")  # the convert protocol's checkpoints
    budget = BudgetConfig(**(QUICK_BUDGET if args.quick else {}))
    jobs = jobs_for(toy, rows, seeds, tasks, args.protocol, work, budget)

    # Each finished run is appended to a log beside the report; a rerun with the same settings reuses it, so an
    # interrupted run resumes and the image and video parts can run one after the other.
    log = args.out.with_name(args.out.name + ".runs.jsonl")
    done = {}
    if log.exists():
        for line in log.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                done[_job_key(record["job"])] = record["result"]
    todo = [] if args.collect_only else [job for job in jobs if _job_key(job) not in done]
    finished = sum(_job_key(job) in done for job in jobs)
    steps = (
        f"row (a) trained {toy.pretrain_steps} steps, then {toy.finetune_steps} fine-tuning steps each"
        if args.protocol == "convert"
        else f"row (a) trained {budget.pretrain_steps} steps, then {budget.finetune_steps} fine-tuning steps each"
        if args.protocol == "budget"
        else f"{toy.steps} steps each"
    )
    print(f"{len(jobs)} runs ({finished} done before) on {args.workers} worker(s), {steps}")
    started = time.perf_counter()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as stream:
        for job, result in _run_all(todo, args.workers):
            stream.write(json.dumps({"job": job, "result": result}) + "\n")
            stream.flush()
            done[_job_key(job)] = result
    results = [done[_job_key(job)] for job in jobs if _job_key(job) in done]
    if not results:
        parser.error(f"no finished run matches these settings in {log}.")
    report = collect(results, toy, argv, budget)
    missing = [{k: v for k, v in job.items() if k not in ("toy", "work")} for job in jobs if _job_key(job) not in done]
    if missing:  # only with --collect-only: said in the report, not hidden
        report["config"]["missing_runs"] = missing
    report["config"]["seconds"] = round(time.perf_counter() - started, 1)
    partial = args.out.with_name(args.out.name + ".partial")
    partial.write_text(json.dumps(report, indent=1))
    partial.replace(args.out)  # never a half-written report
    print(table(report))
    if args.plot:
        from .plots import PLOTS, plot_report

        for path in PLOTS.get(args.protocol, plot_report)(report, args.out.parent):
            print(f"wrote {path}")
    print(f"wrote {args.out} in {report['config']['seconds']:.0f} s")


if __name__ == "__main__":
    main()
