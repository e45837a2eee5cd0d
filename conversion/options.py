"""What the commands' options choose between, and checks of them, importing no torch (so `--help` is quick)."""

import argparse
import math
import re
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
    "video_processing_pvc.py",
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


# Checks of the commands' options, as argparse types: a bad value stops the command at once, before anything loads,
# with one line naming the option (argparse adds "argument --NAME:").


def whole_number(minimum: int, maximum: int | None = None):
    """An argparse type: a whole number of at least `minimum` (and at most `maximum`)."""

    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum or (maximum is not None and value > maximum):
            bound = f"from {minimum} to {maximum}" if maximum is not None else f"of at least {minimum}"
            raise argparse.ArgumentTypeError(f"expected a whole number {bound}, got {text!r}")
        return value

    check.__name__ = "whole number"
    return check


def real_number(minimum: float = 0.0, above: bool = False):
    """An argparse type: a finite number of at least `minimum` (above it, with `above`)."""

    def check(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < minimum or (above and value == minimum):
            bound = f"above {minimum:g}" if above else f"of at least {minimum:g}"
            raise argparse.ArgumentTypeError(f"expected a finite number {bound}, got {text!r}")
        return value

    check.__name__ = "number"
    return check


def nonempty_path(text: str) -> str:
    """An argparse type: a path that is not empty (an empty one would quietly mean the working folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a path, got {text!r}")
    return text


SIZE_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}


def parse_size(size: str) -> int:
    """`5GB`, `400MB`, `300KB` or a number of bytes -> bytes; a ValueError for anything else and for a size that
    rounds to zero bytes (each tensor would go into a file of its own)."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", size.upper())
    if not found:
        raise ValueError(f"cannot read the shard size {size!r}; use e.g. 5GB, 400MB or 300KB")
    value = int(float(found.group(1)) * SIZE_UNITS[found.group(2)])
    if value < 1:
        raise ValueError(f"a shard must hold at least one byte, got {size!r}; use e.g. 5GB, 400MB or 300KB")
    return value


def shard_size(text: str) -> str:
    """An argparse type: a shard size that `parse_size` reads, kept as written."""
    try:
        parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text
