"""Shared helpers: tiny PVC configs and models that run on a CPU in milliseconds."""

import os
import tempfile

# Remote code is cached per process under HF_HOME; keep it (and any Hub access) away from the user's cache.
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="pvc-tests-hf-")
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from pvc import PVCConfig, PVCForConditionalGeneration  # noqa: E402
from pvc.conversion.options import ABLATIONS as TABLE_4  # noqa: E402
from pvc.experiments.toy_task import tiny_tokenizer  # noqa: E402

IMAGE_TOKEN = 127
TINY_VISION = dict(
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=64,
    image_size=56,
    patch_size=7,  # 8 x 8 patch grid: 4 tokens per frame at downsample 0.25, 16 at 0.5
    num_temporal_layers=2,
    adaln_hidden_size=16,
)
TINY_TEXT = dict(
    model_type="qwen2",
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)
# The paper's ablation rows (Table 4), the converter's table, at tiny size: 2 progressive layers where a row has them.
ABLATIONS = {
    row: dict(
        {key: value for key, value in switches.items() if key != "temporal"},
        num_temporal_layers=2 if switches["temporal"] else 0,
    )
    for row, switches in TABLE_4.items()
}


def tiny_config(row="pvc", attn_implementation=None, **overrides):
    switches = dict(ABLATIONS[row], **{key: overrides.pop(key) for key in list(overrides) if key in ABLATIONS[row]})
    vision = dict(TINY_VISION, num_temporal_layers=switches.pop("num_temporal_layers"))
    vision.update(overrides.pop("vision", {}))
    config = PVCConfig(
        vision_config=vision,
        text_config=dict(TINY_TEXT),
        image_token_id=IMAGE_TOKEN,
        image_start_token_id=125,
        image_end_token_id=126,
        **switches,
        **overrides,
    )
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    return config


def randomize_(model, seed=0):
    """Give every parameter a random, non-trivial value: zero-initialised gates and modulation layers included,
    so that every branch of the model is live."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "temporal_gate" in name or "lambda_" in name:
                value = 0.1 + 0.4 * torch.rand(param.shape, generator=generator)
            elif param.ndim == 1:
                value = (name.endswith("weight")) + 0.2 * torch.randn(param.shape, generator=generator)
            else:
                fan_in = param[0].numel() if param.ndim > 1 else 1
                value = torch.randn(param.shape, generator=generator) / fan_in**0.5
            param.copy_(value)
    return model


def tiny_model(row="pvc", seed=0, randomize=True, attn_implementation=None, **overrides):
    torch.manual_seed(seed)
    model = PVCForConditionalGeneration(tiny_config(row, attn_implementation, **overrides))
    if randomize:
        randomize_(model, seed)
    return model.eval()


def assert_adalns_are_plain_layer_norms(model, seed=0):
    """Every AdaLN of `model` (progressive layers and projector) computes LayerNorm(x) without affine, written out by
    hand, whatever its condition: what the paper's initialisation says of a new model."""
    generator = torch.Generator().manual_seed(seed)
    layers = model.model.vision_tower.encoder.layer
    norms = [layer.temporal_norm for layer in layers if hasattr(layer, "temporal_norm")]
    norms.append(model.model.multi_modal_projector.adaln)
    for norm in norms:
        width = norm.norm.normalized_shape[0]
        x, condition = torch.randn(2, 3, width, generator=generator), 5 * torch.randn(2, 3, width, generator=generator)
        by_hand = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + norm.norm.eps)
        with torch.no_grad():
            torch.testing.assert_close(norm(x, condition), by_hand, rtol=1e-5, atol=1e-5)


def prompt(num_visual_tokens, before=(1, 2, 3), after=(4, 5)):
    """input_ids [1, L]: some text, the visual tokens, more text."""
    ids = list(before) + [IMAGE_TOKEN] * num_visual_tokens + list(after)
    return torch.tensor([ids])


@pytest.fixture
def pixels():
    generator = torch.Generator().manual_seed(1234)
    return lambda count: torch.randn(count, 3, 56, 56, generator=generator)


def tiny_processor(**overrides):
    from pvc import PVCImageProcessor, PVCProcessor

    image_processor = PVCImageProcessor(image_size=56, max_tiles=overrides.pop("max_tiles", 4), num_frames=4)
    return PVCProcessor(image_processor, tiny_tokenizer(), tokens_per_frame=4, image_repeat=4, **overrides)


def write_video(path, num_frames, fps=10, gop=8, codec="mpeg4"):
    """A video whose frame i shows a white bar at x = 4 i + 2, readable back from pixels."""
    import av  # a test extra; imported here so that the other tests run without it
    import numpy as np

    width = 4 * num_frames + 8
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, 32, "yuv420p"
        stream.codec_context.gop_size = gop
        stream.codec_context.bit_rate = 4_000_000
        for index in range(num_frames):
            array = np.zeros((32, width, 3), np.uint8)
            array[:, 4 * index : 4 * index + 4] = 255
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
