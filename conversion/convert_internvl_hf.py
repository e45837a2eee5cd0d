"""Checkpoints in transformers' native InternVL layout (`InternVLForConditionalGeneration`, the "-hf" repos) -> PVC.

Their parameter names are PVC's already (DESIGN.md section 6), so only the projector changes and the PVC modules
are added. Both the current layout (`model.vision_tower...`) and the older one (`vision_tower...`,
`language_model.model...`) are read.
"""

import json
from pathlib import Path

from .. import PVCImageProcessor
from .convert_internvl2 import generation_config
from .reading import Checkpoint, ConversionError
from .rules import Conversion, build_config, rule
from .tokenizer_conversion import load_tokenizer

RULES = [
    rule(r"(?:model\.)?vision_tower\.(.+)", r"model.vision_tower.\1"),
    rule(r"model\.language_model\.(.+)", r"model.language_model.\1"),
    rule(r"language_model\.model\.(.+)", r"model.language_model.\1"),
    rule(r"(?:language_model\.)?lm_head\.weight", "lm_head.weight"),
]
PROJECTOR_NAMES = {
    "norm.weight": "layer_norm.weight",
    "norm.bias": "layer_norm.bias",
    "linear_1.weight": "linear_1.weight",
    "linear_1.bias": "linear_1.bias",
    "linear_2.weight": "linear_2.weight",
    "linear_2.bias": "linear_2.bias",
}


def convert(source: Path, source_name: str, ablation: dict, choices: dict | None = None) -> Conversion:
    meta = json.loads((source / "config.json").read_text())
    vision, text = meta.get("vision_config", {}), dict(meta.get("text_config", {}))
    for key, wanted in (
        ("vision_feature_layer", -1),
        ("vision_feature_select_strategy", "default"),
        ("downsample_ratio", 0.5),
    ):
        if meta.get(key, wanted) != wanted:
            raise ConversionError(f"{key}={meta[key]!r} is not supported (InternVL2 uses {wanted!r}).")
    if not vision.get("use_mean_pooling", True) or vision.get("use_mask_token", False):
        raise ConversionError("Only InternViT towers without a final norm or mask token are supported.")
    size = vision.get("image_size", 448)
    patch = vision.get("patch_size", 14)
    tokenizer = load_tokenizer(source)
    if "model_type" not in text:
        raise ConversionError("The source's text_config has no model_type.")
    text = {
        key: value
        for key, value in text.items()
        if key not in ("architectures", "_name_or_path", "dtype", "torch_dtype", "transformers_version")
    }
    vision_settings = dict(
        hidden_size=vision.get("hidden_size", 1024),
        num_hidden_layers=vision.get("num_hidden_layers", 24),
        num_attention_heads=vision.get("num_attention_heads", 16),
        intermediate_size=vision.get("intermediate_size", 4096),
        hidden_act=vision.get("hidden_act", "gelu"),
        attention_bias=vision.get("attention_bias", False),
        use_qk_norm=vision.get("use_qk_norm", False),
        norm_type=vision.get("norm_type", "layer_norm"),
        layer_norm_eps=vision.get("layer_norm_eps", 1e-6),
        image_size=size[0] if isinstance(size, (list, tuple)) else size,
        patch_size=patch[0] if isinstance(patch, (list, tuple)) else patch,
        layer_scale_init_value=vision.get("layer_scale_init_value", 0.1),
    )
    tie = bool(meta.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    config = build_config(vision_settings, text, tokenizer, ablation, tie, choices)
    if meta.get("image_token_id", config.image_token_id) != config.image_token_id:
        raise ConversionError(
            f"config.image_token_id {meta['image_token_id']} is not the tokenizer's <IMG_CONTEXT> "
            f"{config.image_token_id}."
        )
    # Current checkpoints prefix the projector with `model.`, those saved before transformers' refactor do not.
    current = any(key.startswith("model.multi_modal_projector.") for key in Checkpoint(source).keys())
    prefix = "model.multi_modal_projector." if current else "multi_modal_projector."
    return Conversion(
        source=source,
        source_name=source_name,
        config=config,
        rules=RULES,
        drop=[],
        projector={name: prefix + key for name, key in PROJECTOR_NAMES.items()},
        tokenizer=tokenizer,
        chat_style="chatml",
        image_processor=PVCImageProcessor(image_size=config.vision_config.image_size),
        generation_config=generation_config(source, tokenizer, "chatml", config.text_config),
        notes=[f"source layout: transformers InternVL ({config.text_config.model_type} language model)"],
    )
