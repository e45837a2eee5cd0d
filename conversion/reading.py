"""Reading a source checkpoint: safetensors (sharded or not) or PyTorch .bin files, checked as they are opened."""

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .options import missing_folder_message


class ConversionError(ValueError):
    """A source that cannot be converted as asked; the message says why and what to do."""


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
