"""PVC under transformers' own common model and config tests, as transformers tests its native InternVL.

The mixins come from the installed release's source distribution (see transformers_suite.py; skipped with a reason
when it cannot be fetched). A test is skipped here only when it does not apply to a remote-code model or when
native InternVL skips it too; each skip says which.
"""

import unittest
from unittest import mock

import torch
import transformers_suite
from conftest import TINY_VISION, tiny_config
from transformers.models.auto import modeling_auto

from pvc import PVCConfig, PVCForConditionalGeneration, PVCModel

common = transformers_suite.load("test_modeling_common")
config_common = transformers_suite.load("test_configuration_common")

# What transformers' auto tables say of a native model, and the common tests read to pick each class's checks
# (labels for the generation class, no loss for the base model): a remote-code model is in none of them.
AUTO_TABLES = {
    "MODEL_MAPPING_NAMES": "PVCModel",
    "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES": "PVCForConditionalGeneration",
}


VISION = {"num_hidden_layers": 2}


class PVCVideoTester:
    """One video of 3 frames per sample, one tile each: what `get_video_features` takes."""

    def __init__(self, parent: "PVCModelTester", num_frames=3):
        self.parent, self.num_frames = parent, num_frames
        self.num_hidden_layers = VISION["num_hidden_layers"]

    def prepare_config_and_inputs_for_common(self):
        config = self.parent.get_config()
        size = config.vision_config.image_size
        videos = self.parent.batch_size
        inputs = {
            "pixel_values_videos": common.floats_tensor([videos * self.num_frames, 3, size, size]),
            "video_num_frames": torch.full((videos,), self.num_frames),
        }
        return config, inputs


class PVCModelTester:
    """Tiny PVC (row "pvc": progressive layers and projector AdaLN) and a batch of prompts, one image each."""

    def __init__(self, parent, batch_size=3, text_length=7):
        self.parent = parent
        self.batch_size = batch_size
        self.text_length = text_length
        config = self.get_config()
        self.image_tokens = config.tokens_per_frame * config.image_repeat  # one tile per image
        self.seq_length = text_length + self.image_tokens
        # read by the common tests: the language model's sizes, and the vision tower's for the feature methods
        self.num_hidden_layers = config.text_config.num_hidden_layers
        self.hidden_size = config.text_config.hidden_size
        self.num_attention_heads = config.text_config.num_attention_heads
        self.vocab_size = config.text_config.vocab_size
        self.vision_config = dict(TINY_VISION, **VISION)
        self.video_model_tester = PVCVideoTester(self)
        self.is_training = True

    def get_config(self):
        # Within the common tests' limits: 2 layers a tower (here 1 per-frame and 1 progressive), under 1M
        # parameters (a narrow projector AdaLN). Low visual token ids, which survive the tests' shrinking of the
        # vocabulary.
        config = tiny_config(
            "pvc", pad_token_id=0, projector_adaln_hidden_size=32, num_temporal_layers=1, vision=VISION
        )
        config.image_start_token_id, config.image_end_token_id, config.image_token_id = 1, 2, 3
        return config

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        # text tokens avoid padding (0) and the image, <img> and </img> ids
        text = common.ids_tensor([self.batch_size, self.text_length], 100) + 4
        visual = torch.full((self.batch_size, self.image_tokens), config.image_token_id)
        input_ids = torch.cat([text[:, :2], visual, text[:, 2:]], dim=1)
        size = config.vision_config.image_size
        inputs = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "pixel_values": common.floats_tensor([self.batch_size, 3, size, size]),
            "image_num_tiles": torch.ones(self.batch_size, dtype=torch.long),
        }
        return config, inputs


class PVCModelTest(common.ModelTesterMixin, unittest.TestCase):
    all_model_classes = (PVCModel, PVCForConditionalGeneration)
    _is_composite = True

    def setUp(self):
        for table, name in AUTO_TABLES.items():
            patcher = mock.patch.dict(getattr(modeling_auto, table), {"pvc": name})
            patcher.start()
            self.addCleanup(patcher.stop)
        self.model_tester = PVCModelTester(self)
        self.config_tester = config_common.ConfigTester(self, config_class=PVCConfig, has_text_modality=False)

    def test_config(self):
        self.config_tester.run_common_tests()

    @unittest.skip("GenerationTesterMixin is not in transformers' source distribution (see transformers_suite)")
    def test_generation_tester_mixin_inheritance(self):
        pass
