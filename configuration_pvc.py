"""Configuration of PVC (Progressive Visual Token Compression, Yang et al., CVPR 2025).

`PVCVisionConfig` describes the vision tower: InternViT (field names as transformers' InternVL vision
config) plus the progressive layers. `PVCConfig` ties it to any native transformers causal language model
and the token compressor. Defaults describe PVC-InternVL2-8B (InternViT-300M-448px + InternLM2.5-7B-chat
converted to Llama).
"""

from transformers import AutoConfig, PreTrainedConfig

# Written into every saved config so that the Auto classes find the code files beside it. Design decision:
# AutoModel gives the generation model, as InternVL2's remote code did.
AUTO_MAP = {
    "AutoConfig": "configuration_pvc.PVCConfig",
    "AutoModel": "modeling_pvc.PVCForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_pvc.PVCForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_pvc.PVCForConditionalGeneration",
}

# What the projector AdaLN's scale and shift are computed from: the paper's x_hat + TE', or TE' alone (Table 3).
PROJECTOR_ADALN_CONDITIONS = ("input+timestamp", "timestamp")

# InternLM2.5-7B-chat as a native Llama config: the language model of PVC-InternVL2-8B.
DEFAULT_TEXT_CONFIG = {
    "model_type": "llama",
    "vocab_size": 92553,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1000000.0},
    "attention_bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
    "tie_word_embeddings": False,
}


class PVCVisionConfig(PreTrainedConfig):
    r"""
    The vision tower: InternViT whose last `num_temporal_layers` layers are progressive layers (spatial
    attention, then frame-causal temporal attention behind an AdaLN and a zero-initialised gate, then the MLP).

    Args:
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, hidden_act, attention_bias,
        use_qk_norm, norm_type, layer_norm_eps, image_size, patch_size, num_channels, layer_scale_init_value,
        attention_dropout, projection_dropout, hidden_dropout_prob, initializer_range:
            As transformers' `InternVLVisionConfig` (InternViT-300M-448px by default).
        num_temporal_layers (`int`, defaults to 8):
            How many of the last layers get temporal attention. 0 gives plain InternViT.
        adaln_hidden_size (`int`, *optional*):
            Hidden width of the AdaLN modulation MLPs; defaults to `hidden_size`.
        timestamp_scale (`float`, defaults to 1000.0):
            Relative frame timestamps in [0, 1] are multiplied by this before the sinusoidal embedding.
        timestamp_embedding_size (`int`, defaults to 256):
            Width of the sinusoidal timestamp embedding.
        drop_path_rate (`float`, defaults to 0.0):
            Stochastic depth, rising linearly over the layers from 0 to this rate (InternViT's; InternVL2's
            fine-tuning uses it). Training only; 0 leaves the model as it is.
        temporal_gate_init (`float`, defaults to 0.0):
            Initial value of every channel of the temporal gates g. Zero (the paper) makes a fresh progressive
            layer the InternViT layer it extends; a small non-zero value is an option for training from scratch.
        frame_chunk_size (`int`, *optional*, defaults to 16):
            At most this many frames go through a per-frame computation (the spatial attention and MLP of
            every layer) at once, so that activation memory of long videos stays bounded. Results do not
            depend on it. `None` processes all frames together.
    """

    model_type = "pvc_vision"
    base_config_key = "vision_config"
    # Tensor parallelism (vLLM's `--tensor-parallel-size`, transformers' `tp_plan="auto"`): attention by heads, the
    # MLP by its hidden units; everything else (AdaLN modulation, embeddings, norms) is replicated.
    base_model_tp_plan = {
        f"encoder.layer.*.{module}": style
        for attention in ("attention", "temporal_attention")
        for module, style in (
            (f"{attention}.q_proj", "colwise"),
            (f"{attention}.k_proj", "colwise"),
            (f"{attention}.v_proj", "colwise"),
            (f"{attention}.projection_layer", "rowwise"),
        )
    } | {"encoder.layer.*.mlp.fc1": "colwise", "encoder.layer.*.mlp.fc2": "rowwise"}

    def __init__(
        self,
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        hidden_act="gelu",
        attention_bias=True,
        use_qk_norm=False,
        norm_type="layer_norm",
        layer_norm_eps=1e-6,
        image_size=448,
        patch_size=14,
        num_channels=3,
        layer_scale_init_value=0.1,
        attention_dropout=0.0,
        projection_dropout=0.0,
        hidden_dropout_prob=0.0,
        initializer_range=0.02,
        num_temporal_layers=8,
        adaln_hidden_size=None,
        timestamp_scale=1000.0,
        timestamp_embedding_size=256,
        temporal_gate_init=0.0,
        drop_path_rate=0.0,
        frame_chunk_size=16,
        **kwargs,
    ):
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be divisible by num_attention_heads ({num_attention_heads})."
            )
        if not 0 <= num_temporal_layers <= num_hidden_layers:
            raise ValueError(
                f"num_temporal_layers must lie in [0, num_hidden_layers={num_hidden_layers}], got {num_temporal_layers}."
            )
        if norm_type not in ("layer_norm", "rms_norm"):
            raise ValueError(f"norm_type must be 'layer_norm' or 'rms_norm', got {norm_type!r}.")
        if frame_chunk_size is not None and frame_chunk_size < 1:
            raise ValueError(f"frame_chunk_size must be a positive integer or None, got {frame_chunk_size}.")
        if not 0 <= drop_path_rate < 1:
            raise ValueError(f"drop_path_rate must lie in [0, 1), got {drop_path_rate}.")
        if adaln_hidden_size is not None and adaln_hidden_size < 1:
            raise ValueError(f"adaln_hidden_size must be a positive width, got {adaln_hidden_size}.")
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.attention_bias = attention_bias
        self.use_qk_norm = use_qk_norm
        self.norm_type = norm_type
        self.layer_norm_eps = layer_norm_eps
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.layer_scale_init_value = layer_scale_init_value
        self.attention_dropout = attention_dropout
        self.projection_dropout = projection_dropout
        self.hidden_dropout_prob = hidden_dropout_prob
        self.initializer_range = initializer_range
        self.num_temporal_layers = num_temporal_layers
        self.adaln_hidden_size = adaln_hidden_size if adaln_hidden_size is not None else hidden_size
        self.timestamp_scale = timestamp_scale
        self.timestamp_embedding_size = timestamp_embedding_size
        self.temporal_gate_init = temporal_gate_init
        self.drop_path_rate = drop_path_rate
        self.frame_chunk_size = frame_chunk_size
        super().__init__(**kwargs)


class PVCConfig(PreTrainedConfig):
    r"""
    PVC: vision tower -> token compressor (pixel shuffle, AdaLN, MLP) -> language model.

    Args:
        vision_config (`PVCVisionConfig` or `dict`, *optional*): the vision tower.
        text_config (`PreTrainedConfig` or `dict`, *optional*): any native transformers causal-LM config; a dict
            needs its `model_type`. Defaults to InternLM2.5-7B-chat as Llama.
        image_token_id (`int`, defaults to 92546): id of `<IMG_CONTEXT>`, the placeholder of one visual token.
        image_start_token_id, image_end_token_id (`int`, *optional*): ids of `<img>` and `</img>`.
        downsample_ratio (`float`, defaults to 0.25): pixel-shuffle factor; 0.25 keeps 1/16 of the patch tokens
            (64 per 448px frame), 0.5 reproduces InternVL2's 256.
        image_repeat (`int`, defaults to 4): frames of the static video an image becomes.
        projector_adaln (`bool`, defaults to `True`): the projector's norm is an AdaLN conditioned on the frame
            timestamp; `False` gives InternVL's plain LayerNorm.
        projector_adaln_hidden_size (`int`, *optional*): modulation width of that AdaLN; defaults to its input
            width (vision hidden size / downsample_ratio**2).
        projector_adaln_condition (`str`, defaults to `"input+timestamp"`): what that AdaLN's scale and shift are
            computed from: `"input+timestamp"` is the paper's x_hat + TE'; `"timestamp"` is TE' alone (one affine per
            frame, the same for every token; Table 3's "TE" row).
        projector_hidden_act (`str`, defaults to `"gelu"`): activation between the projector's two linears.

    The paper's ablation rows (Table 4) are these switches: (a) InternVL2: `num_temporal_layers=0,
    downsample_ratio=0.5, image_repeat=1, projector_adaln=False`; (b) repeat only: `downsample_ratio=0.25,
    image_repeat=4`, no progressive layers, no projector AdaLN; (c) with progressive layers; PVC: everything.
    """

    model_type = "pvc"
    sub_configs = {"vision_config": PVCVisionConfig, "text_config": AutoConfig}

    def __init__(
        self,
        vision_config=None,
        text_config=None,
        image_token_id=92546,
        image_start_token_id=92544,
        image_end_token_id=92545,
        downsample_ratio=0.25,
        image_repeat=4,
        projector_adaln=True,
        projector_adaln_hidden_size=None,
        projector_adaln_condition="input+timestamp",
        projector_hidden_act="gelu",
        initializer_range=0.02,
        **kwargs,
    ):
        if isinstance(vision_config, dict):
            vision_config = PVCVisionConfig(**vision_config)
        self.vision_config = vision_config if vision_config is not None else PVCVisionConfig()

        if text_config is None:
            text_config = dict(DEFAULT_TEXT_CONFIG)
        if isinstance(text_config, dict):
            text_config = dict(text_config)
            if "model_type" not in text_config:
                raise ValueError(
                    "text_config given as a dict needs a 'model_type' (e.g. 'llama', 'qwen2', 'phi3') to pick "
                    "the transformers config class."
                )
            text_config = AutoConfig.for_model(text_config.pop("model_type"), **text_config)
        self.text_config = text_config

        grid = _as_pair(self.vision_config.image_size)[0] // _as_pair(self.vision_config.patch_size)[0]
        scale = round(1 / downsample_ratio)
        if abs(scale * downsample_ratio - 1) > 1e-6 or grid % scale:
            raise ValueError(
                f"downsample_ratio={downsample_ratio} must be 1/k for an integer k dividing the patch grid side "
                f"({grid} = image_size / patch_size)."
            )
        if image_repeat < 1:
            raise ValueError(f"image_repeat must be at least 1, got {image_repeat}.")
        if projector_adaln_hidden_size is not None and projector_adaln_hidden_size < 1:
            raise ValueError(
                f"projector_adaln_hidden_size must be a positive width, got {projector_adaln_hidden_size}."
            )
        if projector_adaln_condition not in PROJECTOR_ADALN_CONDITIONS:
            raise ValueError(
                f"projector_adaln_condition must be one of {', '.join(map(repr, PROJECTOR_ADALN_CONDITIONS))}, got "
                f"{projector_adaln_condition!r}."
            )

        self.image_token_id = image_token_id
        self.image_start_token_id = image_start_token_id
        self.image_end_token_id = image_end_token_id
        self.downsample_ratio = downsample_ratio
        self.image_repeat = image_repeat
        self.projector_adaln = projector_adaln
        projector_width = self.vision_config.hidden_size * scale**2
        self.projector_adaln_hidden_size = (
            projector_adaln_hidden_size if projector_adaln_hidden_size is not None else projector_width
        )
        self.projector_adaln_condition = projector_adaln_condition
        self.projector_hidden_act = projector_hidden_act
        self.initializer_range = initializer_range
        kwargs.setdefault("tie_word_embeddings", getattr(self.text_config, "tie_word_embeddings", False))
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        super().__init__(**kwargs)

    @property
    def tokens_per_frame(self) -> int:
        """Visual tokens one frame (one tile) costs in the language model: 64 for PVC at 448px."""
        height, width = _as_pair(self.vision_config.image_size)
        patch_h, patch_w = _as_pair(self.vision_config.patch_size)
        return round((height // patch_h) * (width // patch_w) * self.downsample_ratio**2)


def _as_pair(value):
    return tuple(value) if isinstance(value, (list, tuple)) else (value, value)


# Saving writes the code files and the `auto_map` beside the weights, however this file was imported.
PVCConfig.register_for_auto_class()
