"""PVC checkpoints that are InternVL2 (Table 4's row (a): `pvc-convert --ablation a`, or a model trained in that
layout and saved with `save_pretrained`) -> PVC or another ablation row.

Row (a) is InternVL2 in PVC's parameter names (2x2 pixel shuffle, no progressive layers, the projector's plain
LayerNorm), so the key table is the transformers-InternVL one; the source's chat template and image processor
settings are kept as they are.
"""

import json
from pathlib import Path

from .. import PVCImageProcessor
from .convert_internvl2 import END_OF_TURN, generation_config
from .convert_internvl_hf import PROJECTOR_NAMES, RULES
from .reading import ConversionError
from .rules import Conversion, build_config
from .tokenizer_conversion import load_tokenizer

# The switches of row (a); a source with any other value already holds PVC modules or PVC's token layout.
ROW_A = {"downsample_ratio": 0.5, "projector_adaln": False}
# Vision settings that the target's ablation row and the converter's options decide.
NEW_VISION_SETTINGS = ("num_temporal_layers", "adaln_hidden_size")
NOT_CARRIED = ("architectures", "_name_or_path", "dtype", "torch_dtype", "transformers_version")


def convert(source: Path, source_name: str, ablation: dict, choices: dict | None = None) -> Conversion:
    meta = json.loads((source / "config.json").read_text())
    vision, text = dict(meta.get("vision_config", {})), dict(meta.get("text_config", {}))
    differs = {key: meta.get(key) for key, wanted in ROW_A.items() if meta.get(key) != wanted}
    if vision.get("num_temporal_layers", 0):
        differs["vision_config.num_temporal_layers"] = vision["num_temporal_layers"]
    if differs:
        settings = ", ".join(f"{key}={value!r}" for key, value in differs.items())
        raise ConversionError(
            f"{source_name} is a PVC checkpoint with {settings}: only InternVL2-equivalent PVC checkpoints "
            "(ablation row a: downsample_ratio 0.5, no progressive layers, no projector AdaLN) can be converted. "
            "Convert the InternVL2 checkpoint it came from instead."
        )
    if "model_type" not in text:
        raise ConversionError("The source's text_config has no model_type.")
    text = {key: value for key, value in text.items() if key not in NOT_CARRIED}
    vision = {key: value for key, value in vision.items() if key not in NOT_CARRIED + NEW_VISION_SETTINGS}
    vision.pop("model_type", None)
    tokenizer = load_tokenizer(source)
    tie = bool(meta.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    config = build_config(vision, text, tokenizer, ablation, tie, choices)
    template_path = source / "chat_template.jinja"
    template = template_path.read_text() if template_path.exists() else None
    chat_style = next((style for style, token in END_OF_TURN.items() if template and token in template), "chatml")
    image_processor = (
        PVCImageProcessor.from_pretrained(source)
        if (source / "processor_config.json").exists() or (source / "preprocessor_config.json").exists()
        else PVCImageProcessor(image_size=config.vision_config.image_size)
    )
    return Conversion(
        source=source,
        source_name=source_name,
        config=config,
        rules=RULES,
        drop=[],
        projector={name: "model.multi_modal_projector." + key for name, key in PROJECTOR_NAMES.items()},
        tokenizer=tokenizer,
        chat_style=chat_style,
        image_processor=image_processor,
        generation_config=generation_config(source, tokenizer, chat_style, config.text_config),
        notes=[f"source layout: PVC row (a), InternVL2 ({config.text_config.model_type} language model)"],
        chat_template=template,
    )
