"""The training machinery of `pvc-finetune`: the paper's learning-rate groups (`PVCTrainer`), freezing, LoRA."""

import re

from transformers import Trainer, TrainingArguments

from ..modeling_pvc import is_pvc_parameter

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
