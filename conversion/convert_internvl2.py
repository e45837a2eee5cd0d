"""InternVL2 checkpoints in their original remote-code layout (`InternVLChatModel`) -> PVC.

Language models: Qwen2 (InternVL2-1B, kept native), InternLM2 (2B, 8B: converted to native Llama, its
per-key/value-group packed `wqkv` split), Phi-3 (4B, native Phi3 with its fused projections kept).
"""

import json
from pathlib import Path

from transformers import AutoConfig

from .. import PVCImageProcessor
from .reading import ConversionError
from .rules import Conversion, build_config, rule, split_rows
from .tokenizer_conversion import load_tokenizer

# Chat template of each InternVL2 conversation template name.
CHAT_STYLES = {"internlm2-chat": "chatml", "Hermes-2": "chatml", "phi3-chat": "phi3", "internvl2_5": "chatml"}
END_OF_TURN = {"chatml": "<|im_end|>", "phi3": "<|end|>"}

VISION_RULES = [
    rule(r"vision_model\.embeddings\.class_embedding", "model.vision_tower.embeddings.cls_token"),
    rule(r"vision_model\.embeddings\.position_embedding", "model.vision_tower.embeddings.position_embeddings"),
    rule(
        r"vision_model\.embeddings\.patch_embedding\.(weight|bias)",
        r"model.vision_tower.embeddings.patch_embeddings.projection.\1",
    ),
    rule(
        r"vision_model\.encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)",
        *(rf"model.vision_tower.encoder.layer.\1.attention.{name}_proj.\2" for name in "qkv"),
        transform=split_rows(3),
    ),
    rule(
        r"vision_model\.encoder\.layers\.(\d+)\.attn\.proj\.(weight|bias)",
        r"model.vision_tower.encoder.layer.\1.attention.projection_layer.\2",
    ),
    rule(
        r"vision_model\.encoder\.layers\.(\d+)\.attn\.(q|k)_norm\.weight",
        r"model.vision_tower.encoder.layer.\1.attention.\2_norm.weight",
    ),
    rule(
        r"vision_model\.encoder\.layers\.(\d+)\.norm1\.(weight|bias)",
        r"model.vision_tower.encoder.layer.\1.layernorm_before.\2",
    ),
    rule(
        r"vision_model\.encoder\.layers\.(\d+)\.norm2\.(weight|bias)",
        r"model.vision_tower.encoder.layer.\1.layernorm_after.\2",
    ),
    rule(r"vision_model\.encoder\.layers\.(\d+)\.ls1", r"model.vision_tower.encoder.layer.\1.lambda_1"),
    rule(r"vision_model\.encoder\.layers\.(\d+)\.ls2", r"model.vision_tower.encoder.layer.\1.lambda_2"),
    rule(
        r"vision_model\.encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)",
        r"model.vision_tower.encoder.layer.\1.mlp.\2.\3",
    ),
]
PROJECTOR = {
    "norm.weight": "mlp1.0.weight",
    "norm.bias": "mlp1.0.bias",
    "linear_1.weight": "mlp1.1.weight",
    "linear_1.bias": "mlp1.1.bias",
    "linear_2.weight": "mlp1.3.weight",
    "linear_2.bias": "mlp1.3.bias",
}
# Qwen2 and Phi-3 are stored in the transformers layout already.
NATIVE_LLM_RULES = [
    rule(r"language_model\.model\.(.+)", r"model.language_model.\1"),
    rule(r"language_model\.lm_head\.weight", "lm_head.weight"),
]
DROP = [r".*rotary_emb\.inv_freq"]  # non-persistent in current code; old checkpoints may still hold them


def internlm2_rules(llm: dict) -> list:
    heads, kv_heads = llm["num_attention_heads"], llm["num_key_value_heads"]
    head_dim = llm["hidden_size"] // heads
    layer = r"language_model\.model\.layers\.(\d+)\."
    target = r"model.language_model.layers.\1."

    def split_grouped_qkv(tensor):
        # Rows are packed per key/value group: [q heads of the group, its k head, its v head], head_dim rows each.
        grouped = tensor.view(kv_heads, heads // kv_heads + 2, head_dim, *tensor.shape[1:])
        query = grouped[:, :-2].reshape(heads * head_dim, *tensor.shape[1:])
        key = grouped[:, -2].reshape(kv_heads * head_dim, *tensor.shape[1:])
        value = grouped[:, -1].reshape(kv_heads * head_dim, *tensor.shape[1:])
        return query.clone(), key.clone(), value.clone()

    return [
        rule(r"language_model\.model\.tok_embeddings\.weight", "model.language_model.embed_tokens.weight"),
        rule(
            layer + r"attention\.wqkv\.(weight|bias)",
            *(target + f"self_attn.{n}_proj.\\2" for n in "qkv"),
            transform=split_grouped_qkv,
        ),
        rule(layer + r"attention\.wo\.(weight|bias)", target + r"self_attn.o_proj.\2"),
        rule(layer + r"feed_forward\.w1\.weight", target + "mlp.gate_proj.weight"),
        rule(layer + r"feed_forward\.w3\.weight", target + "mlp.up_proj.weight"),
        rule(layer + r"feed_forward\.w2\.weight", target + "mlp.down_proj.weight"),
        rule(layer + r"attention_norm\.weight", target + "input_layernorm.weight"),
        rule(layer + r"ffn_norm\.weight", target + "post_attention_layernorm.weight"),
        rule(r"language_model\.model\.norm\.weight", "model.language_model.norm.weight"),
        rule(r"language_model\.output\.weight", "lm_head.weight"),
    ]


# Keys of the original configs that describe the old code, not the model.
STALE_KEYS = {
    "_name_or_path",
    "architectures",
    "auto_map",
    "attn_implementation",
    "torch_dtype",
    "transformers_version",
    "_commit_hash",
    "use_flash_attn",
    "bias",
    "tokenizer_class",
    "pruned_heads",
    "add_cross_attention",
}


def text_config(llm: dict):
    """A native transformers config for the source's language model."""
    kind = llm.get("model_type")
    common = {key: llm[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if key in llm}
    if kind == "internlm2":
        rope = {"rope_type": "default", "rope_theta": float(llm.get("rope_theta", 10000.0))}
        scaling = llm.get("rope_scaling") or {}
        if scaling:  # InternLM2's dynamic NTK scaling acts past the trained length, as Llama's "dynamic"
            kind_of_scaling = scaling.get("type", scaling.get("rope_type"))
            if kind_of_scaling not in ("dynamic", "linear"):
                raise ConversionError(f"InternLM2 rope scaling {scaling} has no native Llama equivalent.")
            rope.update(rope_type=kind_of_scaling, factor=float(scaling["factor"]))
        return AutoConfig.for_model(
            "llama",
            vocab_size=llm["vocab_size"],
            hidden_size=llm["hidden_size"],
            intermediate_size=llm["intermediate_size"],
            num_hidden_layers=llm["num_hidden_layers"],
            num_attention_heads=llm["num_attention_heads"],
            num_key_value_heads=llm["num_key_value_heads"],
            hidden_act=llm.get("hidden_act", "silu"),
            max_position_embeddings=llm["max_position_embeddings"],
            rms_norm_eps=llm["rms_norm_eps"],
            rope_parameters=rope,
            attention_bias=bool(llm.get("bias", False)),
            mlp_bias=False,
            tie_word_embeddings=bool(llm.get("tie_word_embeddings", False)),
            **common,
        )
    if kind in ("qwen2", "phi3", "llama"):
        values = {key: value for key, value in llm.items() if key not in STALE_KEYS and key != "model_type"}
        scaling = values.pop("rope_scaling", None)
        if kind == "phi3" and scaling:
            kind_of_scaling = scaling.get("type", scaling.get("rope_type"))
            if kind_of_scaling not in ("su", "longrope"):
                raise ConversionError(f"Phi-3 rope scaling {scaling} is not supported.")
            values["rope_parameters"] = {
                "rope_type": "longrope",
                "rope_theta": float(values.pop("rope_theta", 10000.0)),
                "short_factor": scaling["short_factor"],
                "long_factor": scaling["long_factor"],
                "original_max_position_embeddings": values["original_max_position_embeddings"],
            }
        elif scaling:
            values["rope_scaling"] = scaling
        return AutoConfig.for_model(kind, **values)
    raise ConversionError(
        f"Unsupported language model type {kind!r}; InternVL2 checkpoints use qwen2, internlm2, phi3 or llama."
    )


def vision_config(vision: dict, image_size: int) -> dict:
    if vision.get("model_type") not in (None, "intern_vit_6b"):
        raise ConversionError(f"Unsupported vision tower {vision.get('model_type')!r}; expected InternViT.")
    return dict(
        hidden_size=vision["hidden_size"],
        num_hidden_layers=vision["num_hidden_layers"],
        num_attention_heads=vision["num_attention_heads"],
        intermediate_size=vision["intermediate_size"],
        hidden_act=vision.get("hidden_act", "gelu"),
        attention_bias=vision.get("qkv_bias", True),
        use_qk_norm=vision.get("qk_normalization", False),
        norm_type=vision.get("norm_type", "layer_norm"),
        layer_norm_eps=vision.get("layer_norm_eps", 1e-6),
        image_size=image_size,
        patch_size=vision["patch_size"],
        num_channels=vision.get("num_channels", 3),
    )


def convert(source: Path, source_name: str, ablation: dict, choices: dict | None = None) -> Conversion:
    meta = json.loads((source / "config.json").read_text())
    architectures = meta.get("architectures") or []
    if meta.get("model_type") != "internvl_chat" or "InternVLChatModel" not in architectures:
        raise ConversionError(f"{source} is not an InternVLChatModel checkpoint (architectures {architectures}).")
    for key, wanted in (("ps_version", "v2"), ("select_layer", -1), ("use_backbone_lora", 0), ("use_llm_lora", 0)):
        if meta.get(key, wanted) != wanted:
            raise ConversionError(f"{key}={meta[key]!r} is not supported (only {wanted!r}); merge or re-export first.")
    llm, vision = meta["llm_config"], meta["vision_config"]
    tokenizer = load_tokenizer(source)
    template = meta.get("template")
    if template not in CHAT_STYLES:
        raise ConversionError(f"Unknown conversation template {template!r}; known: {sorted(CHAT_STYLES)}.")
    chat_style = CHAT_STYLES[template]
    text = text_config(llm)
    if len(tokenizer) > text.vocab_size:
        raise ConversionError(f"The tokenizer has {len(tokenizer)} tokens, the language model {text.vocab_size}.")
    vision_settings = vision_config(vision, meta.get("force_image_size") or vision["image_size"])
    tie = bool(llm.get("tie_word_embeddings", False))
    config = build_config(vision_settings, text, tokenizer, ablation, tie, choices)
    llm_rules = internlm2_rules(llm) if llm.get("model_type") == "internlm2" else NATIVE_LLM_RULES
    image_processor = PVCImageProcessor(
        image_size=config.vision_config.image_size,
        min_tiles=meta.get("min_dynamic_patch", 1),
        max_tiles=meta.get("max_dynamic_patch", 12) if meta.get("dynamic_image_size", True) else 1,
        use_thumbnail=meta.get("use_thumbnail", True),
    )
    return Conversion(
        source=source,
        source_name=source_name,
        config=config,
        rules=VISION_RULES + llm_rules,
        drop=DROP,
        projector=PROJECTOR,
        tokenizer=tokenizer,
        chat_style=chat_style,
        image_processor=image_processor,
        generation_config=generation_config(source, tokenizer, chat_style, text),
        notes=[f"language model: {llm.get('model_type')} -> {text.model_type}", f"chat template: {template}"],
    )


def generation_config(source: Path, tokenizer, chat_style: str, text) -> dict:
    """The source's generation config, with the template's end-of-turn token among the stop ids."""
    path = source / "generation_config.json"
    generation = json.loads(path.read_text()) if path.exists() else {}
    generation.pop("transformers_version", None)
    stops = generation.get("eos_token_id", text.eos_token_id)
    stops = [stops] if isinstance(stops, int) else list(stops or [])
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN[chat_style])
    if end_of_turn is not None and end_of_turn not in stops:
        stops.append(end_of_turn)
    generation["eos_token_id"] = stops
    generation.setdefault("pad_token_id", tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0])
    return generation


__all__ = ["convert", "text_config", "internlm2_rules", "VISION_RULES", "PROJECTOR"]
