"""PVC (Progressive Visual Token Compression) for Hugging Face Transformers.

The files at the root of this repository are both a Hub model repo (loaded with `trust_remote_code=True`) and
the `pvc` package (`pip install .`); this file is the package's entry point. Its names are imported when first
used, so that the command-line tools answer `--help` without loading torch and transformers.
"""

import importlib

# Where each public name lives.
_EXPORTS = {
    "PVCConfig": "configuration_pvc",
    "PVCVisionConfig": "configuration_pvc",
    "PVCPreTrainedModel": "modeling_pvc",
    "PVCVisionModel": "modeling_pvc",
    "PVCModel": "modeling_pvc",
    "PVCForConditionalGeneration": "modeling_pvc",
    "PVCImageProcessor": "image_processing_pvc",
    "PVCVideoProcessor": "video_processing_pvc",
    "PVCProcessor": "processing_pvc",
    "build_chat_template": "processing_pvc",
    "PVCDataCollator": "training.data",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # imported once
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
