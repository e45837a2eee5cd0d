"""What a conversion is: a key table from source keys to PVC keys (`Rule`, `Conversion`), the PVC config it builds, the
warm-started projector, and the seeded initial values of the modules PVC adds."""

import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import PVCConfig, PVCImageProcessor
from ..modeling_pvc import is_pvc_parameter
from .reading import ConversionError


@dataclass
class Rule:
    """Source keys matching `pattern` become `targets` (regex templates), through `transform` when given
    (a function of the source tensor returning one tensor per target)."""

    pattern: str
    targets: tuple[str, ...]
    transform: Callable[[torch.Tensor], tuple[torch.Tensor, ...]] | None = None

    def match(self, key: str):
        found = re.fullmatch(self.pattern, key)
        if found is None:
            return None
        return [found.expand(target) for target in self.targets]


def rule(pattern, *targets, transform=None) -> Rule:
    return Rule(pattern, targets, transform)


def split_rows(parts: int):
    """Split the rows of a fused weight (or bias) into `parts` equal blocks, e.g. InternViT's qkv."""
    return lambda tensor: tuple(chunk.clone() for chunk in tensor.chunk(parts, dim=0))


@dataclass
class Conversion:
    """What a converter hands to `write_repo`."""

    source: Path
    source_name: str
    config: PVCConfig
    rules: list[Rule]
    drop: list[str]  # regexes of source keys dropped on purpose
    projector: dict[str, str]  # canonical projector name ("norm.weight", "linear_1.bias", ...) -> source key
    tokenizer: "object"
    chat_style: str
    image_processor: PVCImageProcessor
    generation_config: dict
    notes: list[str] = field(default_factory=list)
    chat_template: str | None = None  # the source's own template, kept; None: the one of `chat_style`


def build_config(
    vision: dict, text, tokenizer, ablation: dict, tie_word_embeddings: bool, choices: dict | None = None
) -> PVCConfig:
    """The PVC config of a converted model: the source's towers, the ablation row's switches, the token ids read
    from the tokenizer, and the sizes of the new modules in `choices` (`num_temporal_layers`, default a third of
    the tower's layers, 8 of InternViT-300M's 24; `adaln_hidden_size` and `projector_adaln_hidden_size`, defaults
    C and 16C; `None` means the default)."""
    choices = choices or {}
    temporal = 0
    if ablation["temporal"]:
        temporal = choices.get("num_temporal_layers")
        if temporal is None:
            temporal = round(vision["num_hidden_layers"] / 3)
    vision = dict(vision, num_temporal_layers=temporal, adaln_hidden_size=choices.get("adaln_hidden_size"))
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in ("<img>", "</img>", "<IMG_CONTEXT>")}
    try:
        return PVCConfig(
            vision_config=vision,
            text_config=text,
            image_token_id=ids["<IMG_CONTEXT>"],
            image_start_token_id=ids["<img>"],
            image_end_token_id=ids["</img>"],
            downsample_ratio=ablation["downsample_ratio"],
            image_repeat=ablation["image_repeat"],
            projector_adaln=ablation["projector_adaln"],
            projector_adaln_hidden_size=choices.get("projector_adaln_hidden_size"),
            tie_word_embeddings=tie_word_embeddings,
        )
    except ValueError as error:  # the config's own checks: more progressive layers than layers, a width < 1
        raise ConversionError(str(error)) from None


def convert_projector(source: dict[str, torch.Tensor], config: PVCConfig, init: str) -> dict[str, torch.Tensor]:
    """PVC projector tensors from InternVL2's `LayerNorm(4C) -> Linear(4C, D) -> GELU -> Linear(D, D)`.

    With the same downsample ratio (ablation row a) it is copied. With 4x4 pixel shuffle the first layer takes 16C
    inputs: a k x k group of patches holds (k/2)^2 sub-groups of 2 x 2, each laid out exactly as an InternVL2 token.
    `init="warm"` gives `linear_1` InternVL2's first layer on every sub-group, divided by their number, so that it
    computes the mean of InternVL2's first-layer pre-activations over the sub-groups (exactly so for the linear part;
    the norm now spans the whole group). InternVL2's LayerNorm affine is tiled over the sub-groups, or, where an
    AdaLN replaces the LayerNorm, folded into `linear_1`. `init="random"` keeps only `linear_2` (same shape) and
    leaves `linear_1` and the norm to the model's initialisation. `linear_2` is copied in both cases.
    """
    prefix = "model.multi_modal_projector."
    norm_weight, norm_bias = source["norm.weight"], source["norm.bias"]
    weight_1, bias_1 = source["linear_1.weight"], source["linear_1.bias"]
    out = {prefix + "linear_2.weight": source["linear_2.weight"], prefix + "linear_2.bias": source["linear_2.bias"]}
    width = weight_1.shape[1]  # 4C
    channels = width // 4
    scale = round(1 / config.downsample_ratio)
    if scale == 2:
        out.update({prefix + "layer_norm.weight": norm_weight, prefix + "layer_norm.bias": norm_bias})
        out.update({prefix + "linear_1.weight": weight_1, prefix + "linear_1.bias": bias_1})
        return out
    if init == "random":
        return out
    if scale % 2:
        raise ConversionError(f"A warm-started projector needs an even pixel-shuffle factor, got {scale}.")
    if config.projector_adaln:  # fold the affine: W (w * n + b) + c = (W * w) n + (W b + c)
        weight_1, bias_1 = weight_1 * norm_weight[None], bias_1 + weight_1 @ norm_bias
    # Channel (i, j, c) of a PVC token, i, j < scale, is channel (i % 2, j % 2, c) of sub-group (i // 2, j // 2).
    groups = (scale // 2) ** 2
    sub = weight_1.view(-1, 2, 2, channels)  # [D, i', j', C]
    tiled = sub.repeat(1, scale // 2, scale // 2, 1)  # [D, i, j, C], i = 2 * a + i' (i % 2 == i')
    out[prefix + "linear_1.weight"] = (tiled.reshape(weight_1.shape[0], -1) / groups).contiguous()
    out[prefix + "linear_1.bias"] = bias_1
    if not config.projector_adaln:
        affine = lambda v: v.view(2, 2, channels).repeat(scale // 2, scale // 2, 1).reshape(-1)  # noqa: E731
        out[prefix + "layer_norm.weight"], out[prefix + "layer_norm.bias"] = affine(norm_weight), affine(norm_bias)
    return out


def module_seed(seed: int, name: str) -> int:
    """The random seed of one module's initialisation: a function of the conversion's seed and the module's name
    alone, so a conversion is reproducible and two ablation rows give the modules they share the same values."""
    return zlib.crc32(f"{seed}/{name}".encode())


def init_seeded(owner, module, seed: int, name: str):
    """`owner._init_weights(module)` drawing from a generator of `module_seed(seed, name)`; the global random state
    is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(module_seed(seed, name))
        owner._init_weights(module)


def new_parameters(skeleton, names: set[str], dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Values for the PVC parameters the source does not have, from the model's own `_init_weights` (zero gates,
    identity AdaLN, ...), each module drawn from its own generator (`module_seed`): only the modules that own them
    are materialised."""
    owners = sorted({name.rsplit(".", 1)[0] for name in names})
    values = {}
    for owner in owners:
        module = skeleton.get_submodule(owner)
        module.to_empty(device="cpu", recurse=False)
        # the init of the (sub-)model that owns the module, as from_pretrained would call it
        init_owner = skeleton.model.vision_tower if owner.startswith("model.vision_tower.") else skeleton
        init_seeded(init_owner, module, seed, owner)
        for param_name, param in module.named_parameters(recurse=False):
            full = f"{owner}.{param_name}"
            if full in names:
                values[full] = param.detach().to(dtype).clone()
    return values


def is_new_module(name: str, config: PVCConfig, projector_init: str) -> bool:
    """Parameters a source may lack: PVC's own modules, and the projector parts a random init leaves to the model."""
    if is_pvc_parameter(name):
        return True
    return projector_init == "random" and re.fullmatch(r"model\.multi_modal_projector\.(linear_1|layer_norm)\..*", name)
