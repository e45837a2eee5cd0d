"""PVC (Progressive Visual Token Compression) for Hugging Face Transformers.

The files at the root of this repository are both a Hub model repo (loaded with `trust_remote_code=True`) and
the `pvc` package (`pip install .`); this file is the package's entry point.
"""

from .configuration_pvc import PVCConfig, PVCVisionConfig
from .image_processing_pvc import PVCImageProcessor
from .modeling_pvc import PVCForConditionalGeneration, PVCModel, PVCPreTrainedModel, PVCVisionModel
from .processing_pvc import PVCProcessor, build_chat_template
from .training.data import PVCDataCollator

# Saving a model built from this package writes the code files and the `auto_map` beside the weights.
PVCConfig.register_for_auto_class()
PVCForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
PVCImageProcessor.register_for_auto_class("AutoImageProcessor")
PVCProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "PVCConfig",
    "PVCVisionConfig",
    "PVCPreTrainedModel",
    "PVCVisionModel",
    "PVCModel",
    "PVCForConditionalGeneration",
    "PVCImageProcessor",
    "PVCProcessor",
    "build_chat_template",
    "PVCDataCollator",
]
