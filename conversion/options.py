"""What the commands' options choose between, and checks of them, importing no torch (so `--help` is quick)."""

from pathlib import Path

# Table 4 of the paper as config switches (the number of progressive layers is set separately).
ABLATIONS = {
    "a": dict(temporal=False, downsample_ratio=0.5, image_repeat=1, projector_adaln=False),
    "b": dict(temporal=False, downsample_ratio=0.25, image_repeat=4, projector_adaln=False),
    "c": dict(temporal=True, downsample_ratio=0.25, image_repeat=4, projector_adaln=False),
    "pvc": dict(temporal=True, downsample_ratio=0.25, image_repeat=4, projector_adaln=True),
}
# The Hub code files a checkpoint carries (remote code), copied beside the weights.
CODE_FILES = (
    "configuration_pvc.py",
    "visuals_pvc.py",
    "modeling_pvc.py",
    "video_decoding_pvc.py",
    "image_processing_pvc.py",
    "processing_pvc.py",
)
# --dtype's names -> torch dtype names
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def looks_like_local_path(name: str) -> bool:
    """Whether a model name can only be a local path, never a Hub id (`owner/name`): it starts with `.`, `/` or `~`,
    or has more than one `/` or a backslash."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def missing_folder_message(name: str) -> str | None:
    """For a name that can only be a local path and names no folder: what to say (said at once, never sent to the
    Hub, where it would be a syntax error or, offline, a long wait); otherwise None."""
    if Path(name).expanduser().is_dir() or not looks_like_local_path(name):
        return None
    if Path(name).expanduser().exists():
        return f"{name} is a file; pass the checkpoint's folder."
    return f"{name}: no such folder (a local path, so it was not looked up on the Hub). Check the path."
