"""Training memory of the progressive layers: what autograd keeps for backward, against an ordinary layer and against
transformers' InternVL tower, and gradients equal to those of the layer that kept everything (the reference below).
"""

import pytest
import torch
from einops import rearrange

from pvc import PVCVisionConfig
from pvc.modeling_pvc import PVCVisionLayer, PVCVisionModel, PVCVisionProgressiveLayer

WIDTH = dict(hidden_size=64, num_attention_heads=4, intermediate_size=256, patch_size=14)


def tiny_config(**overrides) -> PVCVisionConfig:
    config = PVCVisionConfig(
        **WIDTH, **{"image_size": 56, "num_hidden_layers": 3, "num_temporal_layers": 2, **overrides}
    )
    config._attn_implementation = "sdpa"
    return config


def checkpointed(tower, reentrant: bool = False):
    """Gradient checkpointing of every layer (5.x's later releases call it activation checkpointing)."""
    if hasattr(tower, "activation_checkpointing_enable"):
        tower.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    else:
        tower.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})


def kept_for_backward(module, run) -> int:
    """Bytes of the tensors autograd saves while `run()` runs a forward, each storage once, `module`'s parameters
    left out (counted here, with saved-tensor hooks)."""
    parameters = {parameter.untyped_storage().data_ptr() for parameter in module.parameters()}
    kept = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in parameters:
            kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(kept.values())


def reference_temporal_branch(layer, hidden_states, temporal_embeds):
    """The temporal branch as it was when it kept every activation for backward (written out here)."""
    streams = hidden_states.shape[0]
    condition = hidden_states + temporal_embeds[:, None]
    normed = rearrange(layer.temporal_norm(hidden_states, condition), "s t n c -> (s n) t c")
    temporal = rearrange(layer.temporal_attention(normed)[0], "(s n) t c -> s t n c", s=streams)
    return layer.drop_path(layer.temporal_gate(temporal))


def gradients(tower, pixels, **kwargs):
    """Loss, input gradient and every parameter's gradient of one training step, from a fixed random state."""
    tower.zero_grad(set_to_none=True)
    pixels = pixels.clone().requires_grad_(True)
    torch.manual_seed(1)  # dropout and drop-path masks
    loss = tower(pixels, **kwargs).last_hidden_state.square().mean()
    loss.backward()
    return loss.detach(), pixels.grad, {name: param.grad for name, param in tower.named_parameters()}


@pytest.mark.parametrize(
    "case",
    [
        "2 streams of 3 frames",
        "static clip",
        "positions in chunks",
        "gradient checkpointing",
        "reentrant checkpointing",
    ],
)
def test_gradients_equal_those_of_the_layer_that_kept_everything(case, monkeypatch):
    """Recomputing the temporal branch in backward changes no gradient: loss, input and every parameter, with
    dropout and drop-path drawing their masks (the recomputation draws the same ones)."""
    config = tiny_config(drop_path_rate=0.3, attention_dropout=0.2, temporal_gate_init=0.5, frame_chunk_size=None)
    torch.manual_seed(0)
    tower = PVCVisionModel(config).train()
    with torch.no_grad():  # no zero-initialised weight, so that every parameter gets a gradient
        for parameter in tower.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    pixels = torch.randn(6, 3, 56, 56)
    kwargs = {"num_frames": 3}
    if case == "static clip":
        pixels, kwargs = pixels[:2], {"num_frames": 4, "static": True}
    if case == "positions in chunks":
        kwargs["frame_chunk_size"] = 1  # chunks of a few token positions in the temporal attention
    if case.endswith("checkpointing"):
        checkpointed(tower, reentrant=case.startswith("re"))
    loss, pixel_grad, grads = gradients(tower, pixels, **kwargs)
    monkeypatch.setattr(PVCVisionProgressiveLayer, "temporal_branch", reference_temporal_branch)
    reference_loss, reference_pixel_grad, reference_grads = gradients(tower, pixels, **kwargs)
    torch.testing.assert_close(loss, reference_loss)
    torch.testing.assert_close(pixel_grad, reference_pixel_grad)
    for name, reference in reference_grads.items():
        assert reference is not None and reference.abs().sum() > 0, name
        torch.testing.assert_close(grads[name], reference, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_progressive_layer_keeps_at_most_a_quarter_more_than_an_ordinary_layer(dtype):
    """Per frame, a progressive layer saves at most 1.25x what an ordinary layer saves for backward (1.89x when its
    temporal branch kept every activation: the rearranged copies, the AdaLN's condition and modulation, the gate's
    product)."""
    torch.manual_seed(0)
    frames = torch.randn(4, 17, WIDTH["hidden_size"], dtype=dtype, requires_grad=True)
    embeds = torch.randn(4, WIDTH["hidden_size"], dtype=dtype, requires_grad=True)
    ordinary = PVCVisionLayer(tiny_config(num_temporal_layers=0)).to(dtype).train()
    progressive = PVCVisionProgressiveLayer(tiny_config()).to(dtype).train()
    plain = kept_for_backward(ordinary, lambda: ordinary(frames))
    temporal = kept_for_backward(progressive, lambda: progressive(frames, embeds, 1))
    assert plain > 0 and temporal <= 1.25 * plain, temporal / plain


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no checkpointing", "gradient checkpointing"])
def test_the_tower_keeps_at_most_a_tenth_more_than_internvl(checkpointing):
    """The whole tower (a third of its layers progressive, as 8 of InternViT-300M's 24) saves at most 1.1x what
    transformers' InternVL tower of the same shape saves for backward, with and without gradient checkpointing."""
    from transformers.models.internvl import InternVLVisionConfig, InternVLVisionModel

    reference_config = InternVLVisionConfig(
        **WIDTH, num_hidden_layers=3, image_size=56, attention_bias=True, layer_norm_eps=1e-6, use_mean_pooling=True
    )
    reference_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    internvl = InternVLVisionModel(reference_config).train()
    pvc = PVCVisionModel(tiny_config(num_temporal_layers=1)).train()
    if checkpointing:
        for tower in (internvl, pvc):
            checkpointed(tower)
    pixels = torch.randn(4, 3, 56, 56)
    theirs = kept_for_backward(internvl, lambda: internvl(pixels))
    ours = kept_for_backward(pvc, lambda: pvc(pixels, num_frames=4))
    assert theirs > 0 and ours <= 1.1 * theirs, ours / theirs
