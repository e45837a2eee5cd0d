"""What every converter shares: reading checkpoints, the projector and the new PVC modules, the tokenizer, and
writing a complete Hub repo atomically.

A converter describes its source as a `Conversion`: the PVC config it builds, and a key table mapping each
source key to PVC keys (with a transform where tensors are split). `write_repo` streams the tensors into
safetensors shards, initialises the modules PVC adds, and fails, leaving nothing behind, when a source key is
neither consumed nor explicitly dropped, or when a PVC parameter gets no value.
"""

import contextlib
import json
import math
import os
import re
import shutil
import signal
import tempfile
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

import pvc
from pvc import PVCConfig, PVCForConditionalGeneration, PVCImageProcessor, PVCProcessor, build_chat_template
from pvc.modeling_pvc import is_pvc_parameter

from .options import CODE_FILES, DTYPE_NAMES, missing_folder_message

DTYPES = {name: getattr(torch, dtype) for name, dtype in DTYPE_NAMES.items()}


class ConversionError(ValueError):
    """A source that cannot be converted as asked; the message says why and what to do."""


# ------------------------------------------------------------------------------------------------------------------
# Reading a source checkpoint
# ------------------------------------------------------------------------------------------------------------------


class Checkpoint:
    """Tensors of a local checkpoint folder, read lazily: `model.safetensors`, sharded safetensors (via the index)
    or, failing those, `pytorch_model*.bin` (sharded via its index, or listed by loading each file) loaded with
    `torch.load(weights_only=True)`. A `.bin` file is loaded whole, so readers go file by file (`keys`,
    `get_many`) and hold one file at a time."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.files: dict[str, Path] = {}  # key -> file
        self._bin_cache: dict[Path, dict] = {}
        single = self.folder / "model.safetensors"
        bins = sorted(self.folder.glob("pytorch_model*.bin"))
        index = self.folder / "model.safetensors.index.json"
        if not index.exists() and not single.exists():
            index = self.folder / "pytorch_model.bin.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {key: self.folder / name for key, name in weight_map.items()}
            missing = sorted({str(path.name) for path in self.files.values() if not path.exists()})
            if missing:
                raise ConversionError(f"Shards named in {index.name} are missing from {self.folder}: {missing}")
        elif single.exists():
            self.files = {key: single for key in self._safetensors_keys(single)}
        elif bins:
            for path in bins:
                self.files.update({key: path for key in self._load_bin(path)})
        else:
            raise ConversionError(f"No model.safetensors(.index.json) or pytorch_model*.bin in {self.folder}.")
        if not self.files:
            raise ConversionError(f"The checkpoint in {self.folder} holds no tensors.")

    def keys(self) -> list[str]:
        """All keys, file by file (then by name)."""
        return self._in_file_order(self.files)

    def get_many(self, keys) -> dict[str, torch.Tensor]:
        """Several tensors, read file by file."""
        return {key: self.get(key) for key in self._in_file_order(keys)}

    def _in_file_order(self, keys) -> list[str]:
        return sorted(keys, key=lambda key: (str(self.files[key]), key))

    def get(self, key: str) -> torch.Tensor:
        path = self.files[key]
        if path.suffix == ".bin":
            return self._load_bin(path)[key]
        try:
            with safe_open(str(path), framework="pt") as handle:
                return handle.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as error:
            raise ConversionError(f"Could not read {key} from {path.name} (truncated or corrupt?): {error}.") from None

    @staticmethod
    def _safetensors_keys(path: Path) -> list[str]:
        _check_safetensors(path)
        try:
            with safe_open(str(path), framework="pt") as handle:
                return list(handle.keys())
        except (SafetensorError, OSError, RuntimeError) as error:
            raise ConversionError(f"{path.name} is truncated or corrupt ({error}). Download it again.") from None

    def _load_bin(self, path: Path) -> dict:
        if path not in self._bin_cache:
            self._bin_cache = {path: torch.load(path, map_location="cpu", weights_only=True)}  # one file at a time
        return self._bin_cache[path]

    def validate(self):
        """Check every shard once, so that a truncated file fails before anything is written."""
        for path in sorted(set(self.files.values())):
            if path.suffix == ".safetensors":
                _check_safetensors(path)


def _check_safetensors(path: Path):
    """A safetensors file must be exactly as long as its header says."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            header_size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(header_size)) if 8 + header_size <= size else None
    except (ValueError, UnicodeDecodeError):
        header = None
    if header is None:
        raise ConversionError(f"{path.name} is truncated or corrupt: its header cannot be read. Download it again.")
    end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0)
    if 8 + header_size + end != size:
        raise ConversionError(
            f"{path.name} is truncated or corrupt: its header describes {8 + header_size + end} bytes, the file "
            f"has {size}. Download it again."
        )


def resolve_source(source: str) -> Path:
    """A local folder as is; anything else is taken as a Hub id and downloaded (weights, configs, tokenizer)."""
    if Path(source).expanduser().is_dir():
        return Path(source).expanduser()
    if Path(source).exists():
        raise ConversionError(f"{source} is a file; pass the checkpoint's folder.")
    if missing := missing_folder_message(source):
        raise ConversionError(missing)
    from huggingface_hub import list_repo_files, snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
    try:
        if not any(name.endswith(".safetensors") for name in list_repo_files(source)):
            patterns.append("pytorch_model*.bin")  # an older checkpoint without safetensors
        return Path(snapshot_download(source, allow_patterns=patterns))
    except Exception as error:  # the Hub's errors: unknown repo, no network (httpx's own errors), a malformed id
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConversionError(
            f"{source} is not a local folder, and downloading it from the Hub failed: {reason}"
        ) from None


# ------------------------------------------------------------------------------------------------------------------
# Key tables
# ------------------------------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------------------------------
# The projector: copied, or warm-started from InternVL2's 2x2 projector
# ------------------------------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------------------------------
# Writing the repo
# ------------------------------------------------------------------------------------------------------------------


def parse_size(size: str) -> int:
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", size.upper())
    if not found:
        raise ConversionError(f"Cannot read the shard size {size!r}; use e.g. 5GB, 400MB or 300KB.")
    return int(float(found.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[found.group(2)])


class ShardWriter:
    """Collect tensors into safetensors shards of at most `max_bytes` each, named as transformers expects."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor):
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self):
        if self.pending:
            save_file(self.pending, str(self.folder / f"shard-{len(self.shards):05d}.tmp"), metadata={"format": "pt"})
            self.shards.append(sorted(self.pending))
            self.pending, self.pending_bytes = {}, 0

    def close(self):
        self.flush()
        if len(self.shards) == 1:
            os.replace(self.folder / "shard-00000.tmp", self.folder / "model.safetensors")
            return
        weight_map = {}
        for index, names in enumerate(self.shards):
            final = f"model-{index + 1:05d}-of-{len(self.shards):05d}.safetensors"
            os.replace(self.folder / f"shard-{index:05d}.tmp", self.folder / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


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


def write_repo(
    conversion: Conversion,
    destination: Path,
    dtype: torch.dtype,
    max_shard_size: str,
    projector_init: str,
    overwrite: bool = False,
    seed: int = 0,
) -> dict:
    """Convert and write the complete repo to `destination` atomically. Returns the summary counts."""
    destination = Path(destination)
    check_destination(Path(conversion.source), destination, overwrite)
    max_bytes = parse_size(max_shard_size)
    checkpoint = Checkpoint(conversion.source)
    checkpoint.validate()
    config = conversion.config
    config.dtype = dtype

    with torch.device("meta"):
        skeleton = PVCForConditionalGeneration(config)
    tied = set(skeleton._tied_weights_keys or {}) if config.tie_word_embeddings else set()
    expected = {name: param.shape for name, param in skeleton.named_parameters()} | {
        name: skeleton.get_parameter(name).shape for name in tied
    }

    # Plan: which source key goes where.
    plan, dropped, unknown = [], [], []
    projector_sources = {key: name for name, key in conversion.projector.items()}
    for key in checkpoint.keys():
        if key in projector_sources:
            continue
        matched = next(((r, targets) for r in conversion.rules if (targets := r.match(key)) is not None), None)
        if any(re.fullmatch(pattern, key) for pattern in conversion.drop):
            dropped.append(key)
        elif matched and all(target in expected for target in matched[1]):
            plan.append((key, *matched))
        else:
            unknown.append(key)
    if unknown:
        raise ConversionError(
            f"{len(unknown)} source keys have no place in PVC and are not known to be droppable: {unknown[:20]}"
            + (" ..." if len(unknown) > 20 else "")
        )
    missing_projector = [key for key in conversion.projector.values() if key not in checkpoint.files]
    if missing_projector:
        raise ConversionError(f"The source lacks projector keys: {missing_projector}")
    sources = checkpoint.get_many(conversion.projector.values())
    projector = convert_projector(
        {name: sources[key].float() for name, key in conversion.projector.items()}, config, projector_init
    )
    produced = {target for _, _, targets in plan for target in targets} | set(projector)
    new_names = set(expected) - produced - tied
    missing = sorted(name for name in new_names if not _is_new_module(name, config, projector_init))
    if missing:
        raise ConversionError(f"The source gives no value for {len(missing)} parameters: {missing[:20]}")

    parent = destination.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-", dir=parent))
    except OSError as error:
        raise ConversionError(f"Cannot write into {parent} ({error.strerror}); choose another --dst.") from None
    try:
        writer = ShardWriter(staging, max_bytes)
        written: dict[str, torch.Size] = {}

        def emit(name, tensor):
            if name not in expected:
                raise ConversionError(f"The converter produced {name}, which PVC does not have.")
            if tuple(tensor.shape) != tuple(expected[name]):
                raise ConversionError(
                    f"{name}: the source gives shape {tuple(tensor.shape)}, PVC expects {tuple(expected[name])}."
                )
            if name in written:
                raise ConversionError(f"{name} is produced twice.")
            writer.add(name, tensor.to(dtype))
            written[name] = tensor.shape

        for key, matched_rule, targets in tqdm(plan, desc="Converting tensors", unit="tensor"):
            tensor = checkpoint.get(key)
            outputs = matched_rule.transform(tensor) if matched_rule.transform else (tensor,)
            for name, value in zip(targets, outputs, strict=True):
                emit(name, value)
        for name, value in projector.items():
            emit(name, value)
        copied = dict(written)
        for name, value in new_parameters(skeleton, new_names, dtype, seed).items():
            emit(name, value)
        writer.close()

        # What was initialised here rather than copied: fine-tuning gives these the paper's larger learning rate.
        config.new_parameters = sorted(new_names)
        _write_side_files(conversion, staging, config)
        write_manifest(staging)
        set_output_modes(staging, destination)
        summary = {
            "copied": (len(copied), sum(math.prod(shape) for shape in copied.values())),
            "new": (len(new_names), sum(math.prod(expected[n]) for n in new_names)),
            "dropped": (len(dropped), sum(tensor.numel() for tensor in checkpoint.get_many(dropped).values())),
        }
        with signals_held():  # a signal now would leave neither the old output nor the new one in place
            if destination.exists():
                backup = Path(tempfile.mkdtemp(prefix=f".{destination.name}.old-", dir=parent))
                os.replace(destination, backup / "old")
                os.replace(staging, destination)
                shutil.rmtree(backup)
            else:
                os.replace(staging, destination)
        return summary
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError):  # a full disk, say: nothing half-written stays behind
            raise ConversionError(f"Writing {destination} failed and nothing was kept: {error}") from error
        raise


# The record of what a conversion wrote, written with it: `--overwrite` replaces a folder only when every file in it
# is one of these, unchanged since (same size and modification time).
MANIFEST = "pvc_conversion.json"


def write_manifest(folder: Path):
    """Record every file in `folder` (a conversion about to be moved into place) with its size and mtime."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            stat = path.stat()
            files[path.relative_to(folder).as_posix()] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    record = {"written_by": "pvc-convert", "files": files}
    (folder / MANIFEST).write_text(json.dumps(record, indent=1) + "\n")


def not_from_conversion(folder: Path) -> list[str]:
    """What in `folder` an earlier conversion did not write or what changed since: names, sorted; every name when the
    folder has no conversion record."""
    try:
        recorded = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        recorded = {}
    foreign = []
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if name == MANIFEST and recorded:
            continue
        if path.is_symlink() or not path.is_file():
            if path.is_symlink() or not any(other.startswith(name + "/") for other in recorded):
                foreign.append(name + ("/" if path.is_dir() and not path.is_symlink() else ""))
            continue
        stat, entry = path.stat(), recorded.get(name)
        if entry is None or (stat.st_size, stat.st_mtime_ns) != (entry["size"], entry["mtime_ns"]):
            foreign.append(name)
    return foreign


def check_destination(source: Path, destination: Path, overwrite: bool):
    """Refuse, before anything is touched, a destination that would destroy the source or anything that is not an
    earlier conversion, exactly as it was written."""
    source_path, destination_path = source.resolve(), destination.resolve()  # through symlinks
    if source_path == destination_path or source_path in destination_path.parents:
        raise ConversionError(
            f"--dst {destination} is the source folder {source} or inside it; write the conversion elsewhere."
        )
    if destination_path in source_path.parents:
        raise ConversionError(f"--dst {destination} contains the source {source}; write the conversion elsewhere.")
    if destination.exists() and not destination.is_dir():
        raise ConversionError(f"--dst {destination} is a file, not a folder; choose another --dst.")
    if not destination.is_dir() or not any(destination.iterdir()):
        return
    if not overwrite:
        raise ConversionError(f"{destination} exists and is not empty; choose another --dst or pass --overwrite.")
    foreign = not_from_conversion(destination)
    if foreign:
        shown = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
        if not (destination / MANIFEST).exists():
            reason = f"it has no {MANIFEST}, the record pvc-convert writes with its files; it holds {shown}"
        else:
            reason = f"these were not written by that conversion, or changed since: {shown}"
        raise ConversionError(
            f"--overwrite replaces only an earlier conversion left as it was written, and {destination} is not one "
            f"({reason}). Nothing was touched: move what you want to keep, or choose another --dst."
        )


def set_output_modes(folder: Path, destination: Path):
    """The permissions a plain write would give (the umask), not the temporary folder's private ones; a destination
    that exists keeps its own mode."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        if not path.is_symlink():  # a link's mode is its target's business
            path.chmod(0o666 & ~umask)
    folder.chmod(destination.stat().st_mode & 0o7777 if destination.is_dir() else 0o777 & ~umask)


class Interrupted(BaseException):
    """A termination signal (SIGTERM, SIGHUP) arrived: unwinds through the clean-up as Ctrl-C does."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def termination_unwinds():
    """SIGTERM and SIGHUP (kill, timeout, batch schedulers) raise `Interrupted` while the block runs."""

    def handler(signum, frame):
        raise Interrupted(signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.signal(number, handler) for number in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


@contextlib.contextmanager
def signals_held():
    """Signals that end the process wait until the block is done."""
    held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _is_new_module(name: str, config: PVCConfig, projector_init: str) -> bool:
    """Parameters a source may lack: PVC's own modules, and the projector parts a random init leaves to the model."""
    if is_pvc_parameter(name):
        return True
    return projector_init == "random" and re.fullmatch(r"model\.multi_modal_projector\.(linear_1|layer_norm)\..*", name)


def _write_side_files(conversion: Conversion, folder: Path, config: PVCConfig):
    config.architectures = ["PVCForConditionalGeneration"]
    config.save_pretrained(folder)
    generation = dict(conversion.generation_config)
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    template = conversion.chat_template or build_chat_template(conversion.chat_style)
    tokenizer = conversion.tokenizer
    tokenizer.chat_template = template  # for those who load the tokenizer alone
    processor = PVCProcessor(
        conversion.image_processor,
        tokenizer,
        chat_template=template,
        tokens_per_frame=config.tokens_per_frame,
        image_repeat=config.image_repeat,
    )
    processor.save_pretrained(folder)
    package = Path(pvc.__file__).parent
    for name in CODE_FILES:
        shutil.copyfile(package / name, folder / name)
    (folder / "README.md").write_text(_model_card(conversion, config))


def _model_card(conversion: Conversion, config: PVCConfig) -> str:
    rows = "\n".join(f"- {note}" for note in conversion.notes)
    return f"""---
license: mit
library_name: transformers
pipeline_tag: image-text-to-text
base_model: {conversion.source_name}
tags:
- pvc
- internvl
- video
---

# PVC converted from {conversion.source_name}

Converted with `pvc-convert` from the InternVL2-family checkpoint `{conversion.source_name}`. The vision tower and the
language model are copied exactly; the modules PVC adds start as the identity (zero temporal gates, identity AdaLN),
so before fine-tuning the vision tower computes what the source's did. Train before expecting PVC's results.

- downsample ratio {config.downsample_ratio} ({config.tokens_per_frame} tokens per frame), image repeat
  {config.image_repeat}, progressive layers {config.vision_config.num_temporal_layers}, projector AdaLN
  {config.projector_adaln}
{rows}

```python
from transformers import AutoModelForImageTextToText, AutoProcessor
model = AutoModelForImageTextToText.from_pretrained(PATH, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(PATH, trust_remote_code=True)
```
"""
