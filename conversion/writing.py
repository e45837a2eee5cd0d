"""Writing a converted checkpoint: safetensors shards, the side files and the model card, moved into place atomically
(nothing half-written on failure), and the manifest that marks a folder as a conversion's output."""

import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .. import PVCConfig, PVCForConditionalGeneration, PVCProcessor, build_chat_template
from .options import CODE_FILES, DTYPE_NAMES, parse_size
from .reading import Checkpoint, ConversionError
from .rules import Conversion, convert_projector, is_new_module, new_parameters
from .signals import signals_held

DTYPES = {name: getattr(torch, dtype) for name, dtype in DTYPE_NAMES.items()}


def shard_bytes(size: str) -> int:
    """`--max-shard-size` in bytes (`options.parse_size`), its complaint as a `ConversionError`."""
    try:
        return parse_size(size)
    except ValueError as error:
        raise ConversionError(f"--max-shard-size: {error}.") from None


def write_failure(error: BaseException) -> str | None:
    """Why a write failed (a full disk, a quota, a read-only or vanished folder), for an error that the libraries
    writing a checkpoint raise when the system refuses a write; None for any other error. Measured on a full tmpfs:
    Python's files raise OSError; safetensors a SafetensorError and tokenizers a plain Exception, each with Rust's
    "... (os error 28)"; torch.save a RuntimeError from its zip writer ("[enforce fail at inline_container.cc] ...
    unexpected pos"), which does not say why."""
    if isinstance(error, OSError):
        return error.strerror or str(error)
    text = str(error)
    found = re.search(r"\(os error (\d+)\)", text)
    if found:
        return os.strerror(int(found.group(1)))
    if isinstance(error, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text):
        return f"torch.save could not write its file ({text.strip().splitlines()[0]})"
    return None


def human_size(size: int) -> str:
    """Bytes as people read them: 1.8 MB, 16.3 GB."""
    for unit in ("bytes", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1000
    return ""


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
    max_bytes = shard_bytes(max_shard_size)
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
    missing = sorted(name for name in new_names if not is_new_module(name, config, projector_init))
    if missing:
        raise ConversionError(f"The source gives no value for {len(missing)} parameters: {missing[:20]}")

    weight_bytes = sum(math.prod(shape) for name, shape in expected.items() if name not in tied) * dtype.itemsize
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
                try:
                    os.replace(staging, destination)
                except BaseException:
                    os.replace(backup / "old", destination)  # the earlier conversion goes back in place
                    backup.rmdir()
                    raise
                shutil.rmtree(backup)
            else:
                os.replace(staging, destination)
        return summary
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        reason = write_failure(error)
        if reason is None:
            raise
        # a full disk, say: nothing half-written stays behind, and an earlier conversion at --dst is untouched
        kept = " (the earlier conversion there is untouched)" if destination.exists() else ""
        raise ConversionError(
            f"Writing {destination} failed and nothing was kept{kept}: {reason}. Free space under {parent} (the "
            f"weights alone take {human_size(weight_bytes)}) or choose another --dst, then run pvc-convert again."
        ) from error


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
    package = Path(__file__).resolve().parents[1]
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
