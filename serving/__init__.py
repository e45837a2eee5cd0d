"""Serving PVC with vLLM: the options that let vLLM's Transformers backend run this repo's model code.

`pvc-serve PATH [vLLM options]` starts vLLM's OpenAI-compatible server with them; `vllm_options()` gives them for
`vllm.LLM(model=PATH, **vllm_options(), ...)`. Nothing here imports vLLM.
"""

import json

from ..configuration_pvc import AUTO_MAP as CHECKPOINT_AUTO_MAP

# vLLM's Transformers backend builds the base model (`AutoModel`) and adds its own LM head; the checkpoints map
# `AutoModel` to the generation model (as InternVL2's remote code did, and as `AutoModel.from_pretrained` users
# expect), so vLLM is told the base model instead, for its run only.
AUTO_MAP = {**CHECKPOINT_AUTO_MAP, "AutoModel": "modeling_pvc.PVCModel"}
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


def server_arguments(user_arguments=()) -> list[str]:
    """The same options as command-line arguments of vLLM's OpenAI-compatible server, followed by
    `user_arguments`; a user's own `--hf-overrides` or `--mm-processor-kwargs` (JSON) is merged into PVC's."""
    user_arguments = list(user_arguments)
    merged = {"--hf-overrides": {"auto_map": dict(AUTO_MAP)}, "--mm-processor-kwargs": dict(PROCESSOR_OPTIONS)}
    for option, ours in merged.items():
        theirs = _pop_option(user_arguments, option)
        if theirs is not None:
            try:
                theirs = json.loads(theirs)
            except json.JSONDecodeError as error:
                raise ValueError(f"{option} takes JSON; got {theirs!r} ({error}).") from None
            ours.update({key: value for key, value in theirs.items() if key not in ("auto_map", "grid_layout")})
    options = ["--trust-remote-code", "--model-impl", "transformers"]
    for option, value in merged.items():
        options += [option, json.dumps(value)]
    return options + user_arguments


def _pop_option(arguments: list[str], option: str) -> str | None:
    """Remove `option VALUE` or `option=VALUE` from `arguments`; its value, or None."""
    for index, argument in enumerate(arguments):
        if argument == option and index + 1 < len(arguments):
            value = arguments[index + 1]
            del arguments[index : index + 2]
            return value
        if argument.startswith(option + "="):
            del arguments[index]
            return argument.split("=", 1)[1]
    return None
