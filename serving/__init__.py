"""Serving PVC with vLLM: the options that let vLLM's Transformers backend run this repo's model code.

`pvc-serve PATH [vLLM options]` starts vLLM's OpenAI-compatible server with them; `vllm_options()` gives them for
`vllm.LLM(model=PATH, **vllm_options(), ...)`. Nothing here imports vLLM.
"""

import json

# vLLM's Transformers backend builds the base model (`AutoModel`) and adds its own LM head; the checkpoints map
# `AutoModel` to the generation model (as InternVL2's remote code did, and as `AutoModel.from_pretrained` users
# expect), so vLLM is told the base model instead, for its run only.
AUTO_MAP = {
    "AutoConfig": "configuration_pvc.PVCConfig",
    "AutoModel": "modeling_pvc.PVCModel",
    "AutoModelForCausalLM": "modeling_pvc.PVCForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_pvc.PVCForConditionalGeneration",
}
# Per-item counts as one row per image and per video, which vLLM splits per item (see PVCProcessor.__call__).
PROCESSOR_OPTIONS = {"grid_layout": True}


def vllm_options() -> dict:
    """Keyword arguments for `vllm.LLM` (or `EngineArgs`) that serve a PVC checkpoint."""
    return dict(
        trust_remote_code=True,
        model_impl="transformers",
        hf_overrides={"auto_map": dict(AUTO_MAP)},
        mm_processor_kwargs=dict(PROCESSOR_OPTIONS),
    )


def server_arguments() -> list[str]:
    """The same options as command-line arguments of vLLM's OpenAI-compatible server."""
    return [
        "--trust-remote-code",
        "--model-impl",
        "transformers",
        "--hf-overrides",
        json.dumps({"auto_map": AUTO_MAP}),
        "--mm-processor-kwargs",
        json.dumps(PROCESSOR_OPTIONS),
    ]
