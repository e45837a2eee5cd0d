"""The training machinery of `pvc-finetune`: the paper's learning-rate groups (`PVCTrainer`), freezing, LoRA, and
which checkpoints are complete."""

import json
import os
import re
import shutil

from transformers import Trainer, TrainingArguments

from ..conversion.writing import write_failure
from ..modeling_pvc import is_pvc_parameter

# What makes a checkpoint-N folder complete. Trainer._save_checkpoint (transformers 5.0 to 5.25) writes the weights
# (and the processor), then the optimizer and scheduler, the grad scaler and the RNG state, and trainer_state.json
# last. A save cut short (SIGKILL, OOM, preemption, a full disk) leaves a folder without trainer_state.json, or with
# one that does not parse; transformers then resumes from it with "Can't find a valid checkpoint" (no weights yet)
# or a FileNotFoundError (weights, no state). Complete: trainer_state.json parses and weights that Trainer resumes
# from are there. Files are not fsynced, so a power cut can still lose what the page cache held.
CHECKPOINT = re.compile(r"checkpoint-(\d+)")
TRAINER_STATE = "trainer_state.json"
WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
)
WEIGHT_FOLDERS = ("pytorch_model_fsdp", "global_step")  # FSDP's sharded state dict, DeepSpeed's engine state


class WriteError(Exception):
    """A checkpoint or the final model could not be written (a full disk): the message says what was kept and what
    to do."""


def checkpoint_folders(folder) -> list[str]:
    """The checkpoint-N folders in `folder`, by step."""
    if not os.path.isdir(folder):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(folder) if (m := CHECKPOINT.fullmatch(name))]
    return [os.path.join(folder, name) for _, name in sorted(found) if os.path.isdir(os.path.join(folder, name))]


def incomplete_because(folder) -> str | None:
    """Why the checkpoint folder is incomplete (a save cut short), or None when it is complete (see above)."""
    try:
        with open(os.path.join(folder, TRAINER_STATE), encoding="utf-8") as file:
            json.load(file)
    except FileNotFoundError:
        return f"no {TRAINER_STATE}, which Trainer writes last"
    except (OSError, ValueError):
        return f"its {TRAINER_STATE} is cut short"
    names = os.listdir(folder)
    if not any(name in WEIGHTS or name.startswith(WEIGHT_FOLDERS) for name in names):
        return "no model weights"
    return None


def last_complete_checkpoint(folder) -> str | None:
    return next((path for path in reversed(checkpoint_folders(folder)) if incomplete_because(path) is None), None)


LORA_TARGETS = {
    "language_model": r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|qkv_proj|gate_proj|up_proj|down_proj|gate_up_proj)",
    "vision_tower": r".*vision_tower\.encoder\.layer\.\d+\.(attention\.(q_proj|k_proj|v_proj|projection_layer)|mlp\.(fc1|fc2))",
}


def new_parameter_rule(model):
    """Which parameters count as new (randomly initialised, so trained at the larger rate, as the paper's section
    3.3): those `pvc-convert` recorded in the config as initialised rather than copied (with `--projector-init
    random`, the projector's first layer too); for checkpoints written before that record, PVC's modules by name."""
    recorded = getattr(getattr(model, "config", None), "new_parameters", None)
    if recorded is None:
        return is_pvc_parameter
    recorded = set(recorded)
    # names as PEFT wraps them: base_model.model.<name>, <module>.modules_to_save.default.<param>
    wrappers = re.compile(r"^base_model\.model\.|\.(modules_to_save\.default|original_module|base_layer)(?=\.)")
    return lambda name: wrappers.sub("", name) in recorded


def parameter_groups(model, learning_rate: float, new_module_multiplier: float, weight_decay: float) -> list[dict]:
    """Optimizer groups: new parameters (see `new_parameter_rule`) at `learning_rate * new_module_multiplier`, the
    rest at `learning_rate`; no weight decay on biases, norms, gates, layer scales and embeddings' 1-D parameters."""
    is_new = new_parameter_rule(model)
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        new = is_new(name)
        decay = param.ndim >= 2
        key = (new, decay)
        if key not in groups:
            groups[key] = {
                "params": [],
                "lr": learning_rate * (new_module_multiplier if new else 1.0),
                "weight_decay": weight_decay if decay else 0.0,
                "name": ("pvc_new" if new else "base") + ("" if decay else "_no_decay"),
            }
        groups[key]["params"].append(param)
    return list(groups.values())


class PVCTrainer(Trainer):
    """`Trainer` whose optimizer gives PVC's new modules a larger learning rate."""

    def __init__(self, *args, new_module_lr_multiplier: float = 10.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.new_module_lr_multiplier = new_module_lr_multiplier

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            groups = parameter_groups(
                opt_model, self.args.learning_rate, self.new_module_lr_multiplier, self.args.weight_decay
            )
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def _save_checkpoint(self, model, trial):
        """Trainer's save of checkpoint-N, made safe to cut short: a folder being written again (a resumed run
        passing a step it saved before) loses its trainer_state.json first, so it never looks complete half-way;
        a save that fails to write (a full disk) removes its half-written folder and raises a one-line
        `WriteError`, the earlier checkpoints as they were. (Trainer's own method, in 5.0 to 5.25: the only hook
        around a checkpoint's whole save.)"""
        folder = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}")
        if self.args.should_save and os.path.exists(os.path.join(folder, TRAINER_STATE)):
            os.remove(os.path.join(folder, TRAINER_STATE))
        try:
            super()._save_checkpoint(model, trial)
        except Exception as error:
            reason = write_failure(error)
            if reason is None:
                raise
            if self.args.should_save:
                shutil.rmtree(folder, ignore_errors=True)
            last = last_complete_checkpoint(self.args.output_dir)
            then = (
                f"{os.path.basename(last)} is the last complete one. Free space under {self.args.output_dir}, then "
                "continue from it with --resume."
                if last
                else f"there is no complete one yet. Free space under {self.args.output_dir}, then run again."
            )
            raise WriteError(
                f"Writing {folder} failed: {reason}. The half-written {os.path.basename(folder)} was removed and {then}"
            ) from error


def freeze(model, vision: bool = False, projector: bool = False, language_model: bool = False):
    """Stop gradients into the chosen parts. Freezing the vision tower keeps PVC's own modules in it trainable:
    they are what fine-tuning a converted model has to learn."""
    parts = {
        "model.vision_tower.": vision,
        "model.multi_modal_projector.": projector,
        "model.language_model.": language_model,
        "lm_head.": language_model,
    }
    for name, param in model.named_parameters():
        for prefix, frozen in parts.items():
            if frozen and name.startswith(prefix) and not (prefix == "model.vision_tower." and is_pvc_parameter(name)):
                param.requires_grad_(False)


def add_lora(
    model,
    rank: int = 16,
    alpha: int = 32,
    dropout: float = 0.05,
    vision: bool = False,
    train_vision: bool = True,
    train_projector: bool = True,
):
    """LoRA adapters on the language model (and on the ViT's linear layers with `vision=True`) through PEFT. What
    LoRA does not cover and is not frozen trains in full and is saved with the adapters: the projector, and the
    vision tower, or, where the ViT has adapters or is frozen, PVC's own modules in it."""
    from peft import LoraConfig, get_peft_model

    targets = LORA_TARGETS["language_model"] + ("|" + LORA_TARGETS["vision_tower"] if vision else "")
    modules_to_save = ["multi_modal_projector"] if train_projector else []
    if train_vision and not vision:
        modules_to_save.append("vision_tower")
    else:
        modules_to_save += ["temporal_attention", "temporal_norm", "temporal_gate", "vision_tower.temporal_embedding"]
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=f"({targets})", modules_to_save=modules_to_save
    )
    return get_peft_model(model, config)


def checkpointing_arguments(enabled: bool) -> dict:
    """Non-reentrant activation checkpointing, under the argument name of the installed transformers."""
    name = (
        "activation_checkpointing"
        if hasattr(TrainingArguments, "activation_checkpointing")
        else "gradient_checkpointing"
    )
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False} if enabled else None}
