"""PVC's processor and image processor under transformers' own common tests (`ProcessorTesterMixin`,
`ImageProcessingTestMixin`), from the installed release's source distribution (see transformers_suite.py). A test
is skipped here only when it does not apply to PVC's remote-code processor; each skip says why.
"""

import unittest
from unittest import mock

import transformers_suite

from pvc import PVCImageProcessor, PVCProcessor
from pvc.experiments.toy_task import tiny_tokenizer

processing_common = transformers_suite.load("test_processing_common")
image_processing_common = transformers_suite.load("test_image_processing_common")


def trusting_remote_code(test: unittest.TestCase):
    """Loading a saved PVC processor runs its remote code: the common tests load as a user with
    `trust_remote_code=True` does."""
    from transformers import dynamic_module_utils
    from transformers.models import auto

    original = dynamic_module_utils.resolve_trust_remote_code

    def trusting(trust_remote_code, *args, **kwargs):
        return original(True if trust_remote_code is None else trust_remote_code, *args, **kwargs)

    for module in list(vars(auto).values()):
        try:
            found = getattr(module, "resolve_trust_remote_code", None)
        except ImportError:  # a stand-in for what needs a missing backend (AutoVideoProcessor without torchvision)
            continue
        if found is original:
            patcher = mock.patch.object(module, "resolve_trust_remote_code", trusting)
            patcher.start()
            test.addCleanup(patcher.stop)


class PVCProcessorTest(processing_common.ProcessorTesterMixin, unittest.TestCase):
    processor_class = PVCProcessor
    # later releases read them from the processor, 5.0 from here
    image_token, video_token = PVCProcessor.image_token, PVCProcessor.video_token

    def setUp(self):
        trusting_remote_code(self)

    @unittest.skip("remote code: the saved processor holds its auto_map, which the reloaded processor's to_dict has")
    def test_processor_from_and_save_pretrained(self):
        pass

    @unittest.skip("remote code: the saved processor holds its auto_map, which the reloaded processor's to_dict has")
    def test_processor_from_and_save_pretrained_as_nested_dict(self):
        pass

    # The mixin gives videos only to a `video_processor` sub-processor that transformers saves and loads
    # (torchvision's BaseVideoProcessor); PVC's is a view of the image processor (PVCVideoProcessor). These tests put
    # a <video> in the prompt and give no video, or count frames PVC would sample: test_processing.py covers them.
    @unittest.skip("the mixin gives no video to a processor without a video_processor sub-processor")
    def test_processor_with_multiple_inputs(self):
        pass

    @unittest.skip("the mixin gives no video to a processor without a video_processor sub-processor")
    def test_replacement_offsets(self):
        pass

    @unittest.skip("pixel_values_videos are frame rows [frames * tiles, 3, H, W]; 5.0's mixin expects [videos, T, ...]")
    def test_apply_chat_template_video_frame_sampling(self):
        pass

    @unittest.skip("PVC samples num_frames frames by default; the mixin counts a video's own frames")
    def test_get_num_multimodal_tokens_matches_processor_call_video(self):
        pass

    # the common tests count one pixel row per image (tiles are PVC's own, tested in test_processing.py)
    @classmethod
    def _setup_image_processor(cls):
        return PVCImageProcessor(image_size=56, max_tiles=1, num_frames=4)

    @classmethod
    def _setup_tokenizer(cls):
        return tiny_tokenizer()

    @staticmethod
    def prepare_processor_dict():
        return {"tokens_per_frame": 4, "image_repeat": 4}


class PVCImageProcessingTester:
    """What the image processing mixin reads (the attributes of transformers 5.0's testers and of later releases'
    `ImageProcessingTester`). One tile per image (`max_tiles=1`): the mixin expects one pixel row per image."""

    batch_size, num_channels, min_resolution, max_resolution = 7, 3, 30, 400

    def __init__(self, parent):
        self.parent = parent
        self.size = {"height": 56, "width": 56}
        self.image_processing_classes = {"pil": PVCImageProcessor}  # PVC's one processor works on PIL images

    def prepare_image_processor_dict(self):
        return {"image_size": 56, "max_tiles": 1, "num_frames": 4}

    def expected_output_image_shape(self, images):
        return self.num_channels, self.size["height"], self.size["width"]

    def prepare_image_inputs(self, equal_resolution=False, numpify=False, torchify=False, **overrides):
        settings = dict(
            batch_size=self.batch_size,
            num_channels=self.num_channels,
            min_resolution=self.min_resolution,
            max_resolution=self.max_resolution,
        )
        settings.update({key: value for key, value in overrides.items() if value is not None})
        return image_processing_common.prepare_image_inputs(
            **settings, equal_resolution=equal_resolution, numpify=numpify, torchify=torchify
        )

    def prepare_processor_inputs(self, **kwargs):
        return {"images": self.prepare_image_inputs(**kwargs)}


class PVCImageProcessingTest(image_processing_common.ImageProcessingTestMixin, unittest.TestCase):
    image_processor_tester_class = PVCImageProcessingTester  # later releases
    image_processing_class = PVCImageProcessor  # transformers 5.0

    def setUp(self):
        super().setUp()
        self.image_processor_tester = PVCImageProcessingTester(self)
        trusting_remote_code(self)

    @property
    def image_processor_dict(self):  # transformers 5.0 reads it from the test (later releases: the mixin)
        return self.image_processor_tester.prepare_image_processor_dict()

    @unittest.skip("InternViT takes 3 channels: with do_convert_rgb=False a 4-channel image is refused (an error)")
    def test_call_numpy_4_channels(self):
        pass

    @unittest.skip("for models inside transformers (dated by their folder); PVC's is remote code, without torchvision")
    def test_new_models_require_torchvision_backend(self):
        pass
