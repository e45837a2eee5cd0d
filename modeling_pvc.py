"""PVC: Progressive Visual Token Compression (Yang et al., CVPR 2025, arXiv 2412.09613).

Every visual input is a clip of frames: a video is its sampled frames, an image (each of its tiles) is a
"static video" of `image_repeat` identical frames. The vision tower is InternViT whose last layers add a
frame-causal temporal attention, so that frame t encodes what frames < t did not; the token compressor keeps
64 tokens per 448px frame (4x4 pixel shuffle) where InternVL2 keeps 256.

    vision tower (PVCVisionModel) -> token compressor (PVCMultiModalProjector) -> language model

Shape letters used in comments:
    S  streams: one (clip, tile position) each; a stream is what temporal attention runs over
    T  frames per clip               P  tiles per frame
    N  tokens per frame (1 CLS + h*w patches)   h, w  patch grid
    C  vision width                  M  compressed tokens per frame     D  text width
"""

import contextlib
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoModel, GenerationMixin, GradientCheckpointingLayer, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.masking_utils import causal_mask_function
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import can_return_tuple, logging
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_pvc import PVCConfig, PVCVisionConfig, _as_pair
from .visuals_pvc import GRID_INPUTS, IMAGE, VIDEO, VisualLayout, items_per_sample, visual_layout, visual_tokens

logger = logging.get_logger(__name__)

# Names of the modules PVC adds to InternVL2: the new parts of the progressive layers, the temporal embeddings and
# the projector's AdaLN. Fine-tuning gives them a larger learning rate; conversion initialises them.
PVC_MODULE_NAMES = ("temporal_attention", "temporal_norm", "temporal_gate", "temporal_embedding", "adaln")


def is_pvc_parameter(name: str) -> bool:
    """Whether a parameter (by its qualified name) belongs to a module PVC adds to InternVL2."""
    return any(part in PVC_MODULE_NAMES for part in name.split("."))


# --------------------------------------------------------------------------------------------------------------
# transformers 5.0 to 5.25: what differs between the releases this file runs on (setup.py's floor and the newest
# tested). Each difference names the release that lets it go: once the floor reaches it, keep the newer side only.
# --------------------------------------------------------------------------------------------------------------

# Until 5.24: the language model's cache argument is `past_key_values` up to 5.23, `cache` from 5.24 on, where the old
# name is deprecated as in transformers' own models (a FutureWarning, then renamed). PVCForConditionalGeneration's
# forward names both (so that generate lets a cache through under either), as does _skip_keys_device_placement.
CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
renames_the_cache_kwarg = (
    deprecate_kwarg("past_key_values", "5.40.0", new_name="cache") if CACHE_NAME == "cache" else lambda forward: forward
)


def vision_attention_interface(self):
    """`PVCVisionAttention.attention_interface`: the attention of `config._attn_implementation` (eager, sdpa,
    flash_attention_2, ...) from transformers' attention interface, looked up at each call, so that
    `set_attn_implementation` switches the vision tower too. Until 5.1, which has `get_interface`: 5.0 registers no
    eager attention, and lets a model switch only where its file reads the interface by
    `self.config._attn_implementation`, as here (5.1 on: where it calls `get_interface`)."""
    if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
        return ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
    if self.config._attn_implementation == "eager":
        return eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]


def without_pixels_after_prefill(model_inputs: dict, is_first_iteration: bool, use_cache: bool) -> dict:
    """Until 5.15, whose generate leaves the pixel inputs out after the prefill itself: the visual features entered
    the cache at prefill, so the decoding steps do not encode the pixels again."""
    if not is_first_iteration and use_cache:
        model_inputs.pop("pixel_values", None)
        model_inputs.pop("pixel_values_videos", None)
    return model_inputs


# --------------------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------------------


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, is_causal=False, **kwargs):
    """Plain attention over [batch, heads, length, head_dim]; returns [batch, length, heads, head_dim]."""
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # [B, H, L, L]
    if attention_mask is not None:
        scores = scores + attention_mask
    if is_causal:
        length = query.shape[2]
        future = torch.ones(length, length, dtype=torch.bool, device=query.device).triu(1)
        scores = scores.masked_fill(future, torch.finfo(scores.dtype).min)
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()  # [B, L, H, d]
    return output, weights


class PVCRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


NORMS = {"layer_norm": nn.LayerNorm, "rms_norm": PVCRMSNorm}


class PVCVisionAttention(nn.Module):
    """Multi-head self-attention over the second axis of [batch, length, C], dispatched through transformers'
    attention interface (eager, sdpa, flash_attention_2, flex_attention). Spatial attention runs over the tokens of a
    frame; temporal attention (`is_causal=True`) over the frames of one token position."""

    def __init__(self, config: PVCVisionConfig, is_causal: bool = False):
        super().__init__()
        self.config = config
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        self.scale = self.head_dim**-0.5
        self.is_causal = is_causal
        self.q_proj = nn.Linear(self.embed_dim, self.embed_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(self.embed_dim, self.embed_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(self.embed_dim, self.embed_dim, bias=config.attention_bias)
        self.projection_layer = nn.Linear(self.embed_dim, self.embed_dim)
        self.projection_dropout = nn.Dropout(config.projection_dropout)
        self.q_norm = PVCRMSNorm(self.embed_dim, config.layer_norm_eps) if config.use_qk_norm else nn.Identity()
        self.k_norm = PVCRMSNorm(self.embed_dim, config.layer_norm_eps) if config.use_qk_norm else nn.Identity()

    def forward(self, hidden_states):
        batch, length, _ = hidden_states.shape
        # -1: the heads this process holds (all of them, or its share under tensor parallelism, which shards q, k, v
        # by heads and the output projection by rows; see PVCVisionConfig.base_model_tp_plan)
        heads = (batch, length, -1, self.head_dim)
        query = self.q_norm(self.q_proj(hidden_states)).view(heads).transpose(1, 2)  # [B, H, L, d]
        key = self.k_norm(self.k_proj(hidden_states)).view(heads).transpose(1, 2)  # [B, H, L, d]
        value = self.v_proj(hidden_states).view(heads).transpose(1, 2)  # [B, H, L, d]
        flex = self.config._attn_implementation == "flex_attention"
        # flex attention reads no `is_causal`: a causal one gets its mask as a BlockMask, as transformers' models do
        attention_mask = causal_block_mask(length, hidden_states.device) if flex and self.is_causal else None
        output, weights = self.attention_interface()(
            self,
            query,
            key,
            value,
            attention_mask,
            scaling=self.scale,
            dropout=self.config.attention_dropout if self.training else 0.0,
            is_causal=self.is_causal,
        )
        output = output.reshape(batch, length, -1)  # [B, L, C / tensor-parallel size]
        weights = None if flex else weights  # flex gives the softmax's log-sum-exp (on GPUs), not its weights
        return self.projection_dropout(self.projection_layer(output)), weights  # weights: eager attention only

    attention_interface = vision_attention_interface  # differs by transformers release (see the banner above)


def causal_block_mask(length: int, device) -> "BlockMask":  # noqa: F821 (torch's, imported only for flex attention)
    """Flex attention's causal mask over `length` positions, the same for every sequence and head."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(causal_mask_function, B=None, H=None, Q_LEN=length, KV_LEN=length, device=device)


class PVCVisionMLP(nn.Module):
    def __init__(self, config: PVCVisionConfig):
        super().__init__()
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states):
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class PVCZeroInitLinear(nn.Linear):
    """A Linear that starts at zero (weight and bias), so the block it ends contributes nothing at first."""


class PVCModulation(nn.Module):
    """Per-token modulation MLP of an AdaLN: Linear -> SiLU -> Linear, the last one zero-initialised."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.act = nn.SiLU()
        self.fc2 = PVCZeroInitLinear(intermediate_size, hidden_size)

    def forward(self, condition):
        return self.fc2(self.act(self.fc1(condition)))


class PVCAdaLayerNorm(nn.Module):
    """AdaLN(x; z) = (1 + scale(z)) * LayerNorm(x) + shift(z): a LayerNorm without its own affine whose
    per-token affine is predicted from the condition z. Starts as the plain (identity-affine) LayerNorm."""

    def __init__(self, hidden_size: int, modulation_size: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, eps=eps, elementwise_affine=False)
        self.scale = PVCModulation(hidden_size, modulation_size)
        self.shift = PVCModulation(hidden_size, modulation_size)

    def forward(self, hidden_states, condition):
        # Design decision (paper silent): the `1 + scale` form of DiT, zero last layers, so a new AdaLN is the LN.
        return self.norm(hidden_states) * (1 + self.scale(condition)) + self.shift(condition)


class PVCGate(nn.Module):
    """Learnable per-channel gate g on a residual branch, initialised to zero (the branch starts switched off) unless
    the config's `temporal_gate_init` says otherwise."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, hidden_states):
        return self.weight * hidden_states


class PVCTimestepEmbedding(nn.Module):
    """Relative frame timestamps -> vectors: sinusoid (as a diffusion timestep embedder), then a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256, timestamp_scale: float = 1000.0):
        super().__init__()
        self.frequency_size = frequency_size
        self.timestamp_scale = timestamp_scale
        self.linear_1 = nn.Linear(frequency_size, hidden_size)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, timestamps):  # [T] in [0, 1]
        half = self.frequency_size // 2
        exponent = torch.arange(half, dtype=torch.float32, device=timestamps.device) / half
        frequencies = torch.exp(-math.log(10000.0) * exponent)  # [256/2]
        angles = (timestamps.float() * self.timestamp_scale)[:, None] * frequencies[None]  # [T, 128]
        # Design decision (paper silent): DiT's timestep embedding, [cos, sin], on timestamps scaled by 1000.
        sinusoid = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # [T, 256]
        sinusoid = sinusoid.to(self.linear_1.weight.dtype)
        return self.linear_2(self.act(self.linear_1(sinusoid)))  # [T, width]


def relative_timestamps(num_frames: int, device=None) -> torch.Tensor:
    """t_k = k / (T - 1) for k = 0..T-1, and [0] for a single frame."""
    return torch.linspace(0, 1, num_frames, device=device) if num_frames > 1 else torch.zeros(1, device=device)


def in_chunks(function, tensor: torch.Tensor, chunk_size: int | None, dim: int = 0) -> torch.Tensor:
    """Apply `function`, which treats the slices of `dim` independently (frames, token positions), at most
    `chunk_size` slices at a time; the results go straight into one output tensor. Same result as one call."""
    if chunk_size is None or tensor.shape[dim] <= chunk_size:
        return function(tensor)
    pieces = tensor.split(chunk_size, dim=dim)
    first = function(pieces[0])
    output = first.new_empty(first.shape[:dim] + (tensor.shape[dim],) + first.shape[dim + 1 :])
    output.narrow(dim, 0, first.shape[dim]).copy_(first)
    start = first.shape[dim]
    del first
    for piece in pieces[1:]:
        output.narrow(dim, start, piece.shape[dim]).copy_(function(piece))
        start += piece.shape[dim]
    return output


# --------------------------------------------------------------------------------------------------------------
# Vision tower
# --------------------------------------------------------------------------------------------------------------


class PVCVisionEmbeddings(nn.Module):
    """Patch embedding, CLS token and learned absolute positions (bicubically interpolated for other sizes)."""

    def __init__(self, config: PVCVisionConfig):
        super().__init__()
        self.patch_size = _as_pair(config.patch_size)
        height, width = _as_pair(config.image_size)
        self.grid = (height // self.patch_size[0], width // self.patch_size[1])
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.patch_embeddings = nn.Module()
        self.patch_embeddings.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=self.patch_size, stride=self.patch_size
        )
        self.position_embeddings = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], config.hidden_size))

    def position_embeddings_for(self, grid_h: int, grid_w: int) -> torch.Tensor:
        if (grid_h, grid_w) == self.grid:
            return self.position_embeddings
        cls_position, patch_positions = self.position_embeddings[:, :1], self.position_embeddings[:, 1:]
        patch_positions = rearrange(patch_positions, "1 (h w) c -> 1 c h w", h=self.grid[0])
        patch_positions = nn.functional.interpolate(
            patch_positions.float(), size=(grid_h, grid_w), mode="bicubic", align_corners=False
        ).to(cls_position.dtype)
        return torch.cat([cls_position, rearrange(patch_positions, "1 c h w -> 1 (h w) c")], dim=1)

    def forward(self, pixel_values):  # [F, 3, H, W]
        projection = self.patch_embeddings.projection
        # The pixels go where the weights are, unless accelerate offloaded them (device_map with "cpu" beside a GPU,
        # or "disk"): they are then on the meta device until its hook loads them, and the hook moves the pixels too.
        device = None if projection.weight.is_meta else projection.weight.device
        patches = projection(pixel_values.to(device, projection.weight.dtype))  # [F, C, h, w]
        grid_h, grid_w = patches.shape[-2:]
        patches = rearrange(patches, "f c h w -> f (h w) c")
        cls = self.cls_token.expand(patches.shape[0], -1, -1)  # [F, 1, C]
        return torch.cat([cls, patches], dim=1) + self.position_embeddings_for(grid_h, grid_w)  # [F, N, C]


class PVCDropPath(nn.Module):
    """Stochastic depth: in training, the whole residual branch of a sample (first axis) is dropped with probability
    `rate` and kept ones are scaled by 1 / (1 - rate); the identity in evaluation."""

    def __init__(self, rate: float = 0.0):
        super().__init__()
        self.rate = rate

    def forward(self, branch):
        if not self.training or self.rate == 0.0:
            return branch
        keep = 1.0 - self.rate
        mask = branch.new_empty((branch.shape[0],) + (1,) * (branch.ndim - 1)).bernoulli_(keep)
        return branch * mask / keep


class PVCVisionLayer(GradientCheckpointingLayer):
    """An InternViT layer, applied to each frame on its own: x + ls1 * S-MHA(LN1(x)), then x + ls2 * FFN(LN2(x))."""

    def __init__(self, config: PVCVisionConfig, drop_path_rate: float = 0.0):
        super().__init__()
        self.attention = PVCVisionAttention(config)
        self.mlp = PVCVisionMLP(config)
        self.layernorm_before = NORMS[config.norm_type](config.hidden_size, eps=config.layer_norm_eps)
        self.layernorm_after = NORMS[config.norm_type](config.hidden_size, eps=config.layer_norm_eps)
        self.lambda_1 = nn.Parameter(torch.full((config.hidden_size,), config.layer_scale_init_value))
        self.lambda_2 = nn.Parameter(torch.full((config.hidden_size,), config.layer_scale_init_value))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.drop_path = PVCDropPath(drop_path_rate)

    def spatial_block(self, hidden_states):  # [F, N, C]
        attended, _ = self.attention(self.layernorm_before(hidden_states))
        return hidden_states + self.drop_path(self.lambda_1 * attended)

    def mlp_block(self, hidden_states):  # [F, N, C]
        branch = self.lambda_2 * self.dropout(self.mlp(self.layernorm_after(hidden_states)))
        return hidden_states + self.drop_path(branch)

    def forward(self, hidden_states):  # [F, N, C]
        return self.mlp_block(self.spatial_block(hidden_states))


class PVCVisionProgressiveLayer(PVCVisionLayer):
    """An InternViT layer with frame-causal temporal attention between its spatial attention and its MLP:

        x = x + ls1 * S-MHA(LN1(x))               per frame
        x = x + g * T-MHA(AdaLN(x; x + TE))        per token position, over the frames of a stream, causal
        x = x + ls2 * FFN(LN2(x))                  per frame

    The gate g starts at zero, so a fresh layer is the InternViT layer it extends.
    """

    def __init__(self, config: PVCVisionConfig, drop_path_rate: float = 0.0):
        super().__init__(config, drop_path_rate)
        self.temporal_norm = PVCAdaLayerNorm(config.hidden_size, config.adaln_hidden_size, config.layer_norm_eps)
        self.temporal_attention = PVCVisionAttention(config, is_causal=True)
        self.temporal_gate = PVCGate(config.hidden_size)

    def forward(self, hidden_states, temporal_embeds, num_streams: int, chunk_size: int | None = None):
        # hidden_states: [S * T_in, N, C] with T_in = T, or T_in = 1 where all frames of a stream are one image
        # (a static clip): they stay shared through the spatial attention and only split here.
        hidden_states = in_chunks(self.spatial_block, hidden_states, chunk_size)
        num_frames = temporal_embeds.shape[0]
        hidden_states = expand_frames(hidden_states, num_streams, num_frames)  # [S, T, N, C]
        # Temporal attention is independent per token position: chunk over positions within the same budget of
        # chunk_size * N tokens (all S streams of T frames take part in each chunk).
        tokens_per_position = num_streams * num_frames
        positions = None if chunk_size is None else max(1, chunk_size * hidden_states.shape[2] // tokens_per_position)
        temporal = in_chunks(lambda part: self.temporal_branch(part, temporal_embeds), hidden_states, positions, dim=2)
        # The residual add goes into the fresh temporal buffer where no gradient needs the operands (inference).
        hidden_states = temporal.add_(hidden_states) if not torch.is_grad_enabled() else hidden_states + temporal
        hidden_states = rearrange(hidden_states, "s t n c -> (s t) n c")
        return in_chunks(self.mlp_block, hidden_states, chunk_size)  # [S * T, N, C]

    def temporal_branch(self, hidden_states, temporal_embeds):  # [S, T, n, C], [T, C]
        """`temporal_block`, whose activations are recomputed in the backward pass rather than kept when gradients
        flow through it (torch's non-reentrant checkpoint; dropout and drop-path draw the same masks again). Kept, they
        made a progressive layer hold 1.9x an ordinary layer's tensors for backward (the rearranged copies, the AdaLN's
        condition and modulation, the gate's product); recomputed, it holds its input and little more (see
        benchmarks/README.md, training memory). The cost is one more forward of this branch per step; with gradient
        checkpointing, whose recomputation of the layer runs it again, two more (the layer's recomputation then peaks
        at an ordinary layer's tensors too)."""
        needs_gradients = torch.is_grad_enabled() and (
            hidden_states.requires_grad
            or temporal_embeds.requires_grad
            or any(parameter.requires_grad for parameter in self.temporal_parameters())
        )
        if not needs_gradients:  # inference, or a frozen tower: nothing is kept for backward anyway
            return self.temporal_block(hidden_states, temporal_embeds)
        return checkpoint(self.temporal_block, hidden_states, temporal_embeds, use_reentrant=False)

    def temporal_parameters(self):
        for module in (self.temporal_norm, self.temporal_attention, self.temporal_gate):
            yield from module.parameters()

    def temporal_block(self, hidden_states, temporal_embeds):  # [S, T, n, C], [T, C]
        """g * T-MHA(AdaLN(x; x + TE)) for some token positions of all frames."""
        streams = hidden_states.shape[0]
        condition = hidden_states + temporal_embeds[:, None]  # [S, T, n, C] + [T, 1, C]
        # Design decision (paper silent): the CLS position takes part in temporal attention like any other token.
        normed = rearrange(self.temporal_norm(hidden_states, condition), "s t n c -> (s n) t c")
        temporal = rearrange(self.temporal_attention(normed)[0], "(s n) t c -> s t n c", s=streams)
        # Design decision (paper silent): stochastic depth drops the temporal branch of a whole stream, at the layer's
        # rate, as it drops the spatial and MLP branches of a frame.
        return self.drop_path(self.temporal_gate(temporal))  # [S, T, n, C]


def expand_frames(hidden_states, num_streams: int, num_frames: int):
    """[S * T_in, ...] -> [S, T, ...]; T_in is T, or 1 for a static clip whose frames share one image."""
    frames = hidden_states.view(num_streams, -1, *hidden_states.shape[1:])  # [S, T_in, ...]
    return frames.expand(-1, num_frames, *frames.shape[2:])


# --------------------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------------------


@dataclass
class PVCVisionModelOutput(BaseModelOutputWithPooling):
    r"""
    The vision tower's output, and that of `get_image_features` / `get_video_features` (see there for their
    `last_hidden_state` and `pooler_output`). On request (`output_hidden_states`, `output_attentions`, as arguments
    or in the vision config):

    hidden_states (`tuple[torch.FloatTensor]`): the embeddings' output and each layer's, `[frames, N, C]` each
        (one row per frame of each stream, as `last_hidden_state`).
    attentions (`tuple[torch.FloatTensor]`): each layer's spatial attention weights, `[frames, heads, N, N]`.
    temporal_attentions (`tuple[torch.FloatTensor]`): each progressive layer's frame-causal attention weights,
        `[S, N, heads, T, T]` (stream, token position); from the feature methods one tensor per image or video,
        `[tiles, N, heads, T, T]`. Attention weights need eager attention (`set_attn_implementation("eager")`).
    """

    temporal_attentions: tuple | None = None


class PVCMultimodalOutput:
    """The outputs of the image and video encoders beside the language model's (transformers' `image_outputs` /
    `video_outputs` convention); `to_tuple` turns them into tuples too."""

    def to_tuple(self):
        return tuple(
            self[key].to_tuple() if key in ("image_outputs", "video_outputs") else self[key] for key in self.keys()
        )


@dataclass
class PVCModelOutputWithPast(PVCMultimodalOutput, BaseModelOutputWithPast):
    r"""
    The language model's output (`last_hidden_state`, its cache, `hidden_states`, `attentions`), and:

    image_outputs (`PVCVisionModelOutput`, *optional*): `get_image_features`' output; `None` without images.
    video_outputs (`PVCVisionModelOutput`, *optional*): `get_video_features`' output; `None` without videos.
    """

    image_outputs: PVCVisionModelOutput | None = None
    video_outputs: PVCVisionModelOutput | None = None


@dataclass
class PVCCausalLMOutputWithPast(PVCMultimodalOutput, CausalLMOutputWithPast):
    r"""
    `loss`, `logits` and the language model's outputs, with `image_outputs` and `video_outputs` as in
    `PVCModelOutputWithPast`.
    """

    image_outputs: PVCVisionModelOutput | None = None
    video_outputs: PVCVisionModelOutput | None = None


class PVCPreTrainedModel(PreTrainedModel):
    config_class = PVCConfig
    base_model_prefix = "model"
    input_modalities = ("image", "video", "text")
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["PVCVisionLayer", "PVCVisionProgressiveLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]  # the cache's two names (until 5.24)
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @property
    def device(self) -> torch.device:
        """The device of the parameters; where accelerate offloaded the first ones (device_map with "disk", or "cpu"
        beside a GPU: on the meta device until its hooks load them), the device its hooks compute on, which
        `generate` then puts its tensors on (as transformers' Bark finds it)."""
        device = super().device
        if device.type != "meta":
            return device
        for module in self.modules():
            execution_device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
            if execution_device is not None:
                return torch.device(execution_device)
        return device

    def _init_weights(self, module):
        config = self.config
        vision_config = getattr(config, "vision_config", config)
        std = getattr(config, "initializer_range", 0.02)
        if isinstance(module, PVCZeroInitLinear):
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            init.normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, PVCRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, PVCVisionEmbeddings):
            init.normal_(module.cls_token, std=std)
            init.normal_(module.position_embeddings, std=std)
        if isinstance(module, PVCVisionLayer):
            init.constant_(module.lambda_1, vision_config.layer_scale_init_value)
            init.constant_(module.lambda_2, vision_config.layer_scale_init_value)
        elif isinstance(module, PVCGate):
            init.constant_(module.weight, getattr(vision_config, "temporal_gate_init", 0.0))


class PVCVisionEncoder(nn.Module):
    """InternViT layers: the first ones per frame, the last `num_temporal_layers` progressive."""

    def __init__(self, config: PVCVisionConfig):
        super().__init__()
        self.num_frame_layers = config.num_hidden_layers - config.num_temporal_layers
        # stochastic depth rising linearly from 0 at the first layer to drop_path_rate at the last, as InternViT's
        # (plain Python: model skeletons are built on the meta device)
        layers = config.num_hidden_layers
        rates = [config.drop_path_rate * index / max(1, layers - 1) for index in range(layers)]
        self.layer = nn.ModuleList(
            [PVCVisionLayer(config, rates[index]) for index in range(self.num_frame_layers)]
            + [PVCVisionProgressiveLayer(config, rates[index]) for index in range(self.num_frame_layers, len(rates))]
        )

    def forward(
        self,
        hidden_states,
        temporal_embeds,
        num_streams: int,
        chunk_size: int | None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ):
        """The last layer's output and, on request, every layer's output and attention weights (spatial, then
        temporal), as the layers give them: `[S * T_in, ...]` per frame, `[S, N, heads, T, T]` per position."""
        states = [hidden_states] if output_hidden_states else None
        spatial = [layer.attention for layer in self.layer] if output_attentions else []
        temporal = [layer.temporal_attention for layer in self.layer[self.num_frame_layers :]] if spatial else []
        with recorded_attention_weights(spatial + temporal) as weights:
            for index, layer in enumerate(self.layer):
                if index < self.num_frame_layers:
                    hidden_states = in_chunks(layer, hidden_states, chunk_size)  # [S * T_in, N, C]
                else:
                    hidden_states = layer(hidden_states, temporal_embeds, num_streams, chunk_size)  # [S * T, N, C]
                if states is not None:
                    states.append(hidden_states)
        if not output_attentions or any(chunk is None for chunks in weights.values() for chunk in chunks):
            return hidden_states, states, None, None  # not asked for, or not eager attention (warned)
        spatial_weights = tuple(torch.cat(weights[module]) for module in spatial)  # chunks of frames
        # chunks of token positions, each [(S n), heads, T, T]
        temporal_weights = tuple(
            torch.cat([chunk.unflatten(0, (num_streams, -1)) for chunk in weights[module]], dim=1)
            for module in temporal
        )
        return hidden_states, states, spatial_weights, temporal_weights


@contextlib.contextmanager
def recorded_attention_weights(modules):
    """The attention weights each of `modules` (`PVCVisionAttention`) computes while the block runs, call by call
    (chunked layers call it once per chunk).

    Hooks of its own, not transformers' output recording (`_can_record_outputs`), for two reasons. The releases share
    no way to it: 5.0 records with `transformers.utils.generic.check_model_inputs` and `OutputRecorder`, 5.2 on with
    `transformers.utils.output_capturing.capture_outputs` (5.25 keeps `check_model_inputs` as a name that records
    nothing), and 5.0 records a second key such as `temporal_attentions` on `output_attentions` where 5.25 asks for
    `output_temporal_attentions`. And what it records does not fit chunked layers: it returns every call as one flat
    tuple, set into the output after `forward` has returned, where the tower needs each layer's chunks joined (frames,
    or token positions in temporal attention), temporal weights per stream and a static clip's weights per frame."""
    weights = {module: [] for module in modules}

    def keep(module, args, output):
        if output[1] is None:  # as transformers' own models: a warning, and no weights
            logger.warning_once(
                f"The vision tower's {module.config._attn_implementation} attention gives no attention weights: call "
                'model.set_attn_implementation("eager") first (or load with attn_implementation="eager").'
            )
        weights[module].append(output[1])

    handles = [module.register_forward_hook(keep) for module in modules]
    try:
        yield weights
    finally:
        for handle in handles:
            handle.remove()


class PVCVisionModel(PVCPreTrainedModel):
    """InternViT with progressive layers. Encodes S streams of T frames each; frames are causal in time."""

    config_class = PVCVisionConfig
    main_input_name = "pixel_values"
    input_modalities = ("image", "video")

    def __init__(self, config: PVCVisionConfig):
        super().__init__(config)
        self.embeddings = PVCVisionEmbeddings(config)
        self.encoder = PVCVisionEncoder(config)
        # One temporal embedding for the whole tower; absent (None) without progressive layers.
        self.temporal_embedding = (
            PVCTimestepEmbedding(config.hidden_size, config.timestamp_embedding_size, config.timestamp_scale)
            if config.num_temporal_layers
            else None
        )
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.patch_embeddings.projection

    @can_return_tuple
    def forward(
        self,
        pixel_values,
        num_frames: int = 1,
        static: bool = False,
        frame_chunk_size="config",
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
    ):
        r"""
        Args:
            pixel_values (`torch.Tensor`): `[S * T, 3, H, W]`, the frames of S streams one stream after the other;
                or, with `static=True`, `[S, 3, H, W]`: each stream is one image seen `num_frames` times (a static
                clip). Its per-frame layers then run once per image and the result is broadcast to the frames at
                the first progressive layer, which is exact.
            num_frames (`int`): T, the frames per stream.
            frame_chunk_size (`int` or `None`): overrides `config.frame_chunk_size` (frames per chunk in the
                per-frame computations; does not change the result).
            output_hidden_states, output_attentions (and return_dict): as in transformers; the config's by default.

        Returns:
            `PVCVisionModelOutput` whose `last_hidden_state` is `[S * T, N, C]` (CLS first in each frame), with
            every layer's output and attention weights on request (static frames broadcast to `[S * T, ...]`).
        """
        config = self.config
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        if frame_chunk_size == "config":
            frame_chunk_size = self.config.frame_chunk_size
        frames_given = 1 if static else num_frames
        if pixel_values.ndim != 4 or pixel_values.shape[0] % frames_given:
            raise ValueError(
                f"pixel_values must be [streams * {frames_given}, channels, height, width] for num_frames="
                f"{num_frames}, static={static}; got shape {tuple(pixel_values.shape)}."
            )
        num_streams = pixel_values.shape[0] // frames_given
        hidden_states = self.embeddings(pixel_values)  # [S * T_in, N, C]
        temporal_embeds = None
        if self.temporal_embedding is not None:
            temporal_embeds = self.temporal_embedding(relative_timestamps(num_frames, hidden_states.device))  # [T, C]
        hidden_states, states, spatial, temporal = self.encoder(
            hidden_states, temporal_embeds, num_streams, frame_chunk_size, output_hidden_states, output_attentions
        )

        def per_frame(tensor):  # [S * T_in, ...] -> [S * T, ...]
            return expand_frames(tensor, num_streams, num_frames).flatten(0, 1)

        output = PVCVisionModelOutput(
            last_hidden_state=per_frame(hidden_states),  # [S * T, N, C]
            hidden_states=tuple(per_frame(state) for state in states) if output_hidden_states else None,
            attentions=None if spatial is None else tuple(per_frame(weights) for weights in spatial),
            temporal_attentions=temporal or None,
        )
        return output


# --------------------------------------------------------------------------------------------------------------
# Token compressor
# --------------------------------------------------------------------------------------------------------------


class PVCMultiModalProjector(nn.Module):
    """Adaptive compression: drop CLS, k x k pixel shuffle (k = 1 / downsample_ratio; InternVL's "v2" order),
    AdaLN conditioned on the frame timestamp (or InternVL's LayerNorm), then Linear -> GELU -> Linear."""

    def __init__(self, config: PVCConfig):
        super().__init__()
        vision = config.vision_config
        self.scale = round(1 / config.downsample_ratio)
        width = vision.hidden_size * self.scale**2
        text_width = config.text_config.hidden_size
        self.adaptive = config.projector_adaln
        if self.adaptive:
            self.temporal_embedding = PVCTimestepEmbedding(
                width, vision.timestamp_embedding_size, vision.timestamp_scale
            )
            # Design decision: full-width (16C) modulation by default; the released 8B checkpoint's size fits it.
            self.adaln = PVCAdaLayerNorm(width, config.projector_adaln_hidden_size, eps=1e-5)
            self.condition_on_input = config.projector_adaln_condition == "input+timestamp"
        else:
            self.layer_norm = nn.LayerNorm(width)
        self.linear_1 = nn.Linear(width, text_width)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(text_width, text_width)

    def pixel_shuffle(self, vision_features, num_frames: int):
        """[S * T, N, C] -> [S, T, M, k*k*C]: each output token holds a k x k block of patches, row-major."""
        side = math.isqrt(vision_features.shape[1] - 1)
        if side * side != vision_features.shape[1] - 1 or side % self.scale:
            raise ValueError(
                f"The vision tower gave {vision_features.shape[1] - 1} patches per frame; the token compressor needs a "
                f"square grid whose side is divisible by {self.scale} (1 / downsample_ratio)."
            )
        return rearrange(
            vision_features[:, 1:],  # drop CLS
            "(s t) (a i b j) c -> s t (a b) (i j c)",
            t=num_frames,
            a=side // self.scale,
            i=self.scale,
            j=self.scale,
        )

    def forward(self, vision_features, num_frames: int):  # [S * T, N, C]
        hidden_states = self.pixel_shuffle(vision_features, num_frames)  # [S, T, M, k*k*C]
        if self.adaptive:
            timestamps = relative_timestamps(num_frames, hidden_states.device)
            temporal_embeds = self.temporal_embedding(timestamps)[None, :, None]  # [1, T, 1, k*k*C]
            # the paper's condition x_hat + TE', or TE' alone (Table 3's "TE" row), the same for every token
            condition = hidden_states + temporal_embeds if self.condition_on_input else temporal_embeds
            hidden_states = self.adaln(hidden_states, condition)
        else:
            hidden_states = self.layer_norm(hidden_states)
        return self.linear_2(self.act(self.linear_1(hidden_states)))  # [S, T, M, D]


# --------------------------------------------------------------------------------------------------------------
# Vision-language model
# --------------------------------------------------------------------------------------------------------------


class PVCModel(PVCPreTrainedModel):
    """Vision tower, token compressor and a native transformers decoder (no LM head)."""

    def __init__(self, config: PVCConfig):
        super().__init__(config)
        self.vision_tower = PVCVisionModel(config.vision_config)
        self.multi_modal_projector = PVCMultiModalProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def encode_clips(self, pixel_values, num_frames: int, static: bool = False):
        """Frames of S streams -> LLM-width tokens [S, T, M, D] (see `PVCVisionModel.forward` for the layout)."""
        vision_features = self.vision_tower(pixel_values, num_frames=num_frames, static=static).last_hidden_state
        return self.multi_modal_projector(vision_features, num_frames)

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values,
        image_num_tiles=None,
        image_grid_thw=None,
        output_hidden_states=None,
        output_attentions=None,
        **kwargs,
    ):
        r"""
        Each image as a static clip of `image_repeat` frames holding all its tiles (`image_num_tiles`, one each by
        default, or the last column of `image_grid_thw`, the processor's `grid_layout`).

        Returns:
            `PVCVisionModelOutput` (a tuple with `return_dict=False`): `pooler_output` holds each image's projected
            tokens in LLM order (frame-major), one `[tokens, D]` tensor per image; `last_hidden_state` is the vision
            tower's output per tile, `[tiles, image_repeat, N, C]`; hidden states and attention weights on request.
        """
        layout = visual_layout(pixel_values, image_num_tiles=image_num_tiles, image_grid_thw=image_grid_thw)
        return self.image_features(pixel_values, layout, output_hidden_states, output_attentions)

    @can_return_tuple
    def get_video_features(
        self,
        pixel_values_videos,
        video_num_frames=None,
        video_num_tiles=None,
        video_grid_thw=None,
        output_hidden_states=None,
        output_attentions=None,
        **kwargs,
    ):
        r"""
        Each video as one clip of its frames (`video_num_frames`), `video_num_tiles` tiles per frame (1 by default);
        or both from `video_grid_thw` (first and last columns). Videos of one shape go through the tower together
        (streams are independent).

        Returns:
            `PVCVisionModelOutput` (a tuple with `return_dict=False`): `pooler_output` holds each video's projected
            tokens in LLM order (frame-major), one `[tokens, D]` tensor per video; `last_hidden_state`, and each of
            the hidden states and spatial attention weights on request, one row per row of `pixel_values_videos`
            (in its frame-major order); temporal attention weights one tensor per video.
        """
        layout = visual_layout(
            pixel_values_videos=pixel_values_videos,
            video_num_frames=video_num_frames,
            video_num_tiles=video_num_tiles,
            video_grid_thw=video_grid_thw,
        )
        return self.video_features(pixel_values_videos, layout, output_hidden_states, output_attentions)

    def image_features(
        self, pixel_values, layout: VisualLayout, output_hidden_states=None, output_attentions=None
    ) -> PVCVisionModelOutput:
        """`get_image_features` for the tiles per image of a `layout` already read: the vision path of images, which
        reads no count tensor (compiled, it is one graph)."""
        tiles = layout.image_tiles
        repeat = self.config.image_repeat
        vision = self.vision_tower(
            pixel_values,
            num_frames=repeat,
            static=True,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
        )
        features = self.multi_modal_projector(vision.last_hidden_state, repeat)  # [tiles, T, M, D]
        output = PVCVisionModelOutput(
            last_hidden_state=vision.last_hidden_state.unflatten(0, (-1, repeat)),  # [tiles, T, N, C]
            pooler_output=tuple(rearrange(image, "p t m d -> (t p m) d") for image in features.split(tiles)),
            hidden_states=vision.hidden_states,
            attentions=vision.attentions,
            temporal_attentions=_per_item(vision.temporal_attentions, tiles),
        )
        return output

    def video_features(
        self, pixel_values_videos, layout: VisualLayout, output_hidden_states=None, output_attentions=None
    ) -> PVCVisionModelOutput:
        """`get_video_features` for the frames and tiles per video of a `layout` already read: the vision path of
        videos, which reads no count tensor (compiled, it is one graph for each set of video shapes)."""
        frames, tiles = layout.video_frames, layout.video_tiles
        clips = pixel_values_videos.split(layout.video_rows)
        per_video = [None] * len(clips)  # each video's (features, tower output)
        for shape in dict.fromkeys(zip(frames, tiles)):
            num_frames, num_tiles = shape
            same = [index for index, other in enumerate(zip(frames, tiles)) if other == shape]
            streams = [rearrange(clips[i], "(t p) c h w -> (p t) c h w", p=num_tiles) for i in same]  # tile streams
            vision = self.vision_tower(
                torch.cat(streams),
                num_frames=num_frames,
                output_hidden_states=output_hidden_states,
                output_attentions=output_attentions,
                return_dict=True,
            )
            features = self.multi_modal_projector(vision.last_hidden_state, num_frames)  # [videos * P, T, M, D]
            for position, (index, clip_features) in enumerate(zip(same, features.split(num_tiles))):
                per_video[index] = (
                    rearrange(clip_features, "p t m d -> (t p m) d"),
                    _stream_rows(vision, position, num_frames, num_tiles),
                )
        outputs = [output for _, output in per_video]
        output = PVCVisionModelOutput(
            last_hidden_state=torch.cat([output["last_hidden_state"] for output in outputs]),
            pooler_output=tuple(features for features, _ in per_video),
            hidden_states=_concatenated_layers(outputs, "hidden_states"),
            attentions=_concatenated_layers(outputs, "attentions"),
            temporal_attentions=_layers_per_item(outputs, "temporal_attentions"),
        )
        return output

    @can_return_tuple
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        pixel_values=None,
        image_num_tiles=None,
        pixel_values_videos=None,
        video_num_frames=None,
        video_num_tiles=None,
        visual_order=None,
        inputs_embeds=None,
        image_grid_thw=None,
        video_grid_thw=None,
        **kwargs,
    ):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        # The count inputs, read once: every shape and split of the vision path follows from `layout`, which is passed
        # along. Under torch.compile the graph breaks here, before any work, where the counts come as tensors (they
        # must become Python ints; lists of ints need no break); the vision path after it is one graph.
        layout = visual_layout(
            pixel_values,
            pixel_values_videos,
            image_num_tiles=image_num_tiles,
            video_num_frames=video_num_frames,
            video_num_tiles=video_num_tiles,
            visual_order=visual_order,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
        )
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)  # [B, L, D]
        # the language model's options, which the vision tower follows too (else its own config's)
        options = {key: kwargs.get(key) for key in ("output_hidden_states", "output_attentions")}

        image_outputs = video_outputs = None
        if pixel_values is not None:
            image_outputs = self.image_features(pixel_values, layout, **options)
        if pixel_values_videos is not None:
            video_outputs = self.video_features(pixel_values_videos, layout, **options)
        images = [] if image_outputs is None else list(image_outputs.pooler_output)
        videos = [] if video_outputs is None else list(video_outputs.pooler_output)
        if images or videos:
            items = layout.in_text_order(images, videos)
            features = torch.cat(items)
            mask = self.placeholder_mask(input_ids, inputs_embeds)  # [B, L]
            # Each sample's placeholders, read to check that its tokens take whole items: under torch.compile the
            # graph breaks here too (after the vision path), as the check needs the numbers.
            placeholders = mask.sum(1).tolist()
            if sum(placeholders) != features.shape[0]:
                raise ValueError(
                    f"The text holds {sum(placeholders)} image tokens (id {self.config.image_token_id}) but the "
                    f"images and videos give {features.shape[0]} features. Build the prompt with PVCProcessor, "
                    f"which expands each <image>/<video> placeholder to the right number of tokens."
                )
            items_per_sample(items, placeholders, [len(item) for item in items])  # each sample takes whole items
            features = features.to(inputs_embeds.device, inputs_embeds.dtype)
            inputs_embeds = inputs_embeds.masked_scatter(mask[..., None].to(inputs_embeds.device), features)
        elif self.training and torch.is_grad_enabled():
            inputs_embeds = inputs_embeds + self.visual_path_at_zero(inputs_embeds.device).to(inputs_embeds.dtype)

        outputs = self.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, return_dict=True, **kwargs
        )
        output = PVCModelOutputWithPast(**outputs, image_outputs=image_outputs, video_outputs=video_outputs)
        return output

    def visual_path_at_zero(self, device):
        """0 x the features of one blank frame: a training batch without media still runs the vision tower and the
        token compressor, so every trainable parameter gets a gradient (zero) on every step, as DDP (with
        find_unused_parameters=False), FSDP and DeepSpeed expect. Costs one frame's forward and backward."""
        height, width = _as_pair(self.config.vision_config.image_size)
        dtype = self.vision_tower.get_input_embeddings().weight.dtype
        # made where the text is: the tower moves it as it moves pixels (the weights may be offloaded, so meta)
        blank = torch.zeros(1, self.config.vision_config.num_channels, height, width, device=device, dtype=dtype)
        return 0.0 * self.encode_clips(blank, num_frames=1).sum()

    def placeholder_mask(self, input_ids, inputs_embeds):
        if input_ids is not None:
            return input_ids == self.config.image_token_id
        token = torch.tensor(self.config.image_token_id, device=inputs_embeds.device)
        embedded = self.get_input_embeddings()(token).to(inputs_embeds.device)  # accelerate may compute it elsewhere
        return (inputs_embeds == embedded).all(-1)


class PVCForConditionalGeneration(PVCPreTrainedModel, GenerationMixin):
    """PVC with a language-modelling head: `forward` for training, `generate` for inference."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    # decoding steps compile as one graph (generate compiles them with a static cache)
    _can_compile_fullgraph = True
    # tensor parallelism: the head is split by vocabulary like the input embedding it may be tied to
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: PVCConfig):
        super().__init__(config)
        self.model = PVCModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def get_image_features(self, pixel_values, image_num_tiles=None, **kwargs):
        """See `PVCModel.get_image_features`."""
        return self.model.get_image_features(pixel_values, image_num_tiles, **kwargs)

    def get_video_features(self, pixel_values_videos, video_num_frames=None, video_num_tiles=None, **kwargs):
        """See `PVCModel.get_video_features`."""
        return self.model.get_video_features(pixel_values_videos, video_num_frames, video_num_tiles, **kwargs)

    @can_return_tuple
    @renames_the_cache_kwarg
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        pixel_values=None,
        image_num_tiles=None,
        pixel_values_videos=None,
        video_num_frames=None,
        video_num_tiles=None,
        visual_order=None,
        inputs_embeds=None,
        labels=None,
        logits_to_keep=0,
        past_key_values=None,
        cache=None,
        **kwargs,
    ):
        r"""
        Args:
            input_ids, attention_mask, inputs_embeds: as any causal LM; `image_token_id` marks visual tokens.
            pixel_values (`[total_tiles, 3, H, W]`) and image_num_tiles (`[num_images]`, default one tile each).
            pixel_values_videos (`[total_frames * tiles, 3, H, W]`, frame-major) and video_num_frames
                (`[num_videos]`); video_num_tiles (`[num_videos]`, tiles per frame, default 1).
            visual_order (`[num_images + num_videos]`): 0 for an image, 1 for a video, in text order; needed only
                when a batch holds both.
            labels (`[B, L]`): next-token targets, -100 where no loss is wanted.
            past_key_values / cache: a `Cache` for the language model (`generate` fills it; one may be passed in to
                reuse it across turns), under the name of the installed transformers (5.0: `past_key_values`).
            Other keyword arguments (position_ids, use_cache, ...) go to the language model.
        """
        # Both named so that `generate` lets a cache through; whichever was given goes on under its own name.
        kwargs.update(
            {
                name: value
                for name, value in (("past_key_values", past_key_values), ("cache", cache))
                if value is not None
            }
        )
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            image_num_tiles=image_num_tiles,
            pixel_values_videos=pixel_values_videos,
            video_num_frames=video_num_frames,
            video_num_tiles=video_num_tiles,
            visual_order=visual_order,
            inputs_embeds=inputs_embeds,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state  # [B, L, D]
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep])  # [B, L', vocab]
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        # The language model's own output fields (the cache is `cache` or `past_key_values`, by version), and the
        # image and video encoders'.
        extra = {key: value for key, value in outputs.items() if key != "last_hidden_state"}
        output = PVCCausalLMOutputWithPast(loss=loss, logits=logits, **extra)
        return output

    VISUAL_INPUTS = (
        "pixel_values",
        "image_num_tiles",
        "pixel_values_videos",
        "video_num_frames",
        "video_num_tiles",
        "visual_order",
    )

    def generate(self, inputs=None, *args, **kwargs):
        """transformers' `generate`; assisted decoding from `inputs_embeds` alone is refused before any work."""
        config = (args[0] if args else kwargs.get("generation_config")) or self.generation_config
        lookup = kwargs.get("prompt_lookup_num_tokens", getattr(config, "prompt_lookup_num_tokens", None))
        assisted = kwargs.get("assistant_model") is not None or lookup
        has_ids = inputs is not None or kwargs.get("input_ids") is not None
        if assisted and kwargs.get("inputs_embeds") is not None and not has_ids:
            # transformers 5.0 fails on it for every model (or masks the whole prompt), later releases whenever the
            # attention mask holds padding; an assistant model never sees the prompt
            raise ValueError(
                "Assisted decoding (assistant_model, prompt_lookup_num_tokens) works on the prompt's ids: an assistant "
                "model reads them, prompt lookup searches them, and transformers cuts the attention mask to them. A "
                "prompt given as inputs_embeds has none: pass input_ids (with the <IMG_CONTEXT> tokens) instead."
            )
        return super().generate(inputs, *args, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, inputs_embeds=None, is_first_iteration=False, **kwargs):
        # inputs_embeds named here: `generate(inputs_embeds=...)` checks this signature for it
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration, **kwargs
        )
        return without_pixels_after_prefill(model_inputs, is_first_iteration, kwargs.get("use_cache", True))

    def _maybe_initialize_input_ids_for_generation(self, inputs=None, bos_token_id=None, model_kwargs=None):
        """`generate` without `input_ids` counts the samples in the first tensor among its inputs; pixel rows are
        tiles and frames, not samples, so the text's tensors (`inputs_embeds`, `attention_mask`) come first."""
        if model_kwargs:
            model_kwargs = dict(
                sorted(model_kwargs.items(), key=lambda item: item[0] in self.VISUAL_INPUTS + GRID_INPUTS)
            )
        return super()._maybe_initialize_input_ids_for_generation(inputs, bos_token_id, model_kwargs)

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """Beam search and `num_return_sequences` repeat every sample; the visuals must follow their sample as a
        whole (the default would repeat each tile, or frame, on its own)."""
        visual_inputs = self.VISUAL_INPUTS + GRID_INPUTS
        visual = {key: model_kwargs.pop(key) for key in visual_inputs if model_kwargs.get(key) is not None}
        if visual and expand_size > 1:
            # each sample's placeholders, from its ids or (generate(inputs_embeds=...): no ids) its embeddings
            text = input_ids if input_ids is not None and input_ids.shape[-1] else None
            mask = self.model.placeholder_mask(text, None if text is not None else model_kwargs.get("inputs_embeds"))
            layout = visual_layout(**visual)
            pixels = (visual.get("pixel_values"), visual.get("pixel_values_videos"))
            visual = self._repeat_visuals_per_sample(mask.sum(1).tolist(), expand_size, layout, *pixels)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        return input_ids, {**model_kwargs, **visual}

    def _repeat_visuals_per_sample(
        self, placeholders, times, layout: VisualLayout, pixel_values=None, pixel_values_videos=None
    ):
        """Each sample's images and videos, `times` over, in the sample's place: the batch's visuals in text order
        are dealt to the samples by their `<IMG_CONTEXT>` counts (`placeholders`, one per sample), each item whole
        (an error when a sample's count does not end on an item's boundary). The counts come out one entry per item
        (`image_num_tiles`, `video_num_frames`, `video_num_tiles`), with `visual_order` where both kinds are there."""
        config = self.config
        images, videos = [], []
        if pixel_values is not None:
            for rows, tiles in zip(pixel_values.split(layout.image_tiles), layout.image_tiles):
                tokens = visual_tokens(config.tokens_per_frame, config.image_repeat, IMAGE, tiles)
                images.append(VisualItem(IMAGE, rows, config.image_repeat, tiles, tokens))
        if pixel_values_videos is not None:
            clips = pixel_values_videos.split(layout.video_rows)
            for clip, frames, tiles in zip(clips, layout.video_frames, layout.video_tiles):
                tokens = visual_tokens(config.tokens_per_frame, config.image_repeat, VIDEO, tiles, frames)
                videos.append(VisualItem(VIDEO, clip, frames, tiles, tokens))
        ordered = layout.in_text_order(images, videos)
        per_sample = items_per_sample(ordered, placeholders, [item.tokens for item in ordered])
        repeated = [item for sample in per_sample for _ in range(times) for item in sample]
        out = {}
        image_items = [item for item in repeated if item.kind == IMAGE]
        video_items = [item for item in repeated if item.kind == VIDEO]
        if image_items:
            out["pixel_values"] = torch.cat([item.pixels for item in image_items])
            out["image_num_tiles"] = torch.tensor([item.tiles for item in image_items])
        if video_items:
            out["pixel_values_videos"] = torch.cat([item.pixels for item in video_items])
            out["video_num_frames"] = torch.tensor([item.frames for item in video_items])
            out["video_num_tiles"] = torch.tensor([item.tiles for item in video_items])
        if image_items and video_items:
            out["visual_order"] = torch.tensor([item.kind for item in repeated])
        return out


class VisualItem(NamedTuple):
    """One image or video of a batch: its kind (IMAGE, VIDEO), pixel rows, frames (an image's static clip:
    `image_repeat`), tiles per frame and the `<IMG_CONTEXT>` tokens it fills."""

    kind: int
    pixels: torch.Tensor
    frames: int
    tiles: int
    tokens: int


def _per_item(layers, counts):
    """Per layer, one tensor per item: each layer's `[S, ...]` split into the items' streams (`counts` each)."""
    return None if layers is None else tuple(tuple(layer.split(counts)) for layer in layers)


def _stream_rows(vision: PVCVisionModelOutput, position: int, num_frames: int, num_tiles: int) -> dict:
    """The part of a tower output that belongs to the `position`-th video of a group (P tile streams of T frames
    each), its per-frame rows back in the video's own frame-major order."""
    frames = slice(position * num_tiles * num_frames, (position + 1) * num_tiles * num_frames)

    def rows(tensor):  # [(videos P T), ...] -> this video's [(T P), ...]
        return rearrange(tensor[frames], "(p t) ... -> (t p) ...", p=num_tiles)

    streams = slice(position * num_tiles, (position + 1) * num_tiles)
    layers = {key: getattr(vision, key) for key in ("hidden_states", "attentions", "temporal_attentions")}
    return {
        "last_hidden_state": rows(vision.last_hidden_state),
        "hidden_states": None if layers["hidden_states"] is None else [rows(h) for h in layers["hidden_states"]],
        "attentions": None if layers["attentions"] is None else [rows(a) for a in layers["attentions"]],
        "temporal_attentions": (
            None if layers["temporal_attentions"] is None else [a[streams] for a in layers["temporal_attentions"]]
        ),
    }


def _concatenated_layers(outputs: list[dict], key: str):
    """Per layer, the items' rows concatenated (in item order)."""
    if outputs[0][key] is None:
        return None
    return tuple(torch.cat(parts) for parts in zip(*(output[key] for output in outputs)))


def _layers_per_item(outputs: list[dict], key: str):
    """Per layer, one tensor per item."""
    return None if outputs[0][key] is None else tuple(zip(*(output[key] for output in outputs)))


# Saving writes the code files and the `auto_map` beside the weights, however this file was imported.
PVCForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = ["PVCPreTrainedModel", "PVCVisionModel", "PVCModel", "PVCForConditionalGeneration"]
