"""Pixels for PVC: InternVL's dynamic-resolution tiling of images, with torchvision or PIL.

An image becomes its tiles (an aspect-ratio grid of 448px tiles, plus a thumbnail when there is more than one
tile); the model turns each image into a static clip of `image_repeat` frames itself, so pixels are sent once.
Videos are sampled and decoded by `video_processing_pvc.py` and `video_decoding_pvc.py`, which cut their frames into
tiles with this file's `PVCImageProcessor`.
"""

import functools
import io
import math
import os
from collections.abc import Mapping
from typing import TypedDict

import numpy as np
import torch
from PIL import Image, ImageOps
from transformers import BatchFeature, ImageProcessingMixin

from .video_decoding_pvc import check_sampling, read_video, sample_indices

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def tile_grid(width: int, height: int, min_tiles: int, max_tiles: int, tile_size: int) -> tuple[int, int]:
    """InternVL's rule: the (columns, rows) grid with min_tiles <= columns * rows <= max_tiles whose aspect ratio
    is closest to the image's; on a tie, the larger grid wins if the image covers more than half of it."""
    grids = sorted(
        {(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1) if min_tiles <= c * r <= max_tiles},
        key=lambda grid: (grid[0] * grid[1], grid),
    )
    aspect = width / height
    best, best_difference = (1, 1), float("inf")
    for columns, rows in grids:
        difference = abs(aspect - columns / rows)
        if difference < best_difference:
            best, best_difference = (columns, rows), difference
        elif difference == best_difference and width * height > 0.5 * tile_size * tile_size * columns * rows:
            best = (columns, rows)
    return best


def largest_grid(max_tiles: int) -> tuple[int, int]:
    """The (columns, rows) grid of at most `max_tiles` tiles that holds the most, the squarest of those (wider on a
    tie): 4 x 3 for 12. An image of that shape is cut into the most tiles `tile_grid` gives."""
    grids = [(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles // c + 1)]
    return max(grids, key=lambda grid: (grid[0] * grid[1], -abs(grid[0] - grid[1]), grid[0]))


def to_pil(image, input_data_format=None, convert_rgb: bool = True) -> Image.Image:
    """A PIL image, numpy array (HWC or HW; uint8, other integers in 0..255, uint16, or floats in 0..1), torch tensor
    (CHW or HWC, the same types) or path, as RGB. High bit-depth images are scaled to 8 bits by their range (see `_to_8_bits`).
    `input_data_format` ("channels_first" or "channels_last", transformers' `ChannelDimension`) says how a 3-d array
    or tensor is laid out; without it, one whose first axis looks like channels (1, 3 or 4, the last not) is CHW. With
    `convert_rgb=False` an image that is not RGB is an error."""
    layout = getattr(input_data_format, "value", input_data_format)
    if layout not in (None, "channels_first", "channels_last"):
        raise ValueError(f"input_data_format must be 'channels_first' or 'channels_last'; got {input_data_format!r}.")
    if isinstance(image, (str, os.PathLike)):
        image = _open_image(image)
    elif isinstance(image, torch.Tensor):
        array = image.detach().cpu()
        looks_chw = array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4)
        if array.ndim == 3 and (layout == "channels_first" or (layout is None and looks_chw)):
            array = array.permute(1, 2, 0)  # CHW -> HWC
        image = array.numpy()
    elif isinstance(image, np.ndarray) and image.ndim == 3:
        looks_chw = image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4)  # as transformers infers it
        if layout == "channels_first" or (layout is None and looks_chw):
            image = image.transpose(1, 2, 0)
    if isinstance(image, np.ndarray):
        image = _array_to_pil(image)
    if not isinstance(image, Image.Image):
        raise TypeError(
            f"Unsupported image type {type(image).__name__}: pass a PIL image, a numpy array, a torch tensor or a "
            "path (or a list of these)."
        )
    if image.width == 0 or image.height == 0:
        raise ValueError(f"Got an empty image ({image.width}x{image.height} pixels).")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if not convert_rgb and image.mode != "RGB":
        raise ValueError(
            f"do_convert_rgb=False, but an image is in mode {image.mode}: the model takes RGB. Leave do_convert_rgb on "
            "(the default) to convert it."
        )
    if image.mode.startswith("I") or image.mode == "F":
        image = _to_8_bits(image)
    return image.convert("RGB")


def _to_8_bits(image: Image.Image) -> Image.Image:
    """High bit-depth greyscale (which `convert("RGB")` clips to near white) scaled to 8 bits by its range: 16-bit
    modes by 0..65535, 32-bit integer and float images by their own minimum and maximum."""
    array = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16"):
        low, high = 0.0, 65535.0
    else:
        low, high = float(array.min()), float(array.max())
    scaled = (array - low) * (255.0 / (high - low)) if high > low else np.zeros_like(array)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def _open_image(path) -> Image.Image:
    path = str(path)
    if path.startswith(("http://", "https://")):
        return _fetch_image(path)
    if path.startswith("data:"):
        from transformers.image_utils import load_image

        return load_image(path)
    try:
        with Image.open(path) as image:
            # Upright as a viewer shows it (camera EXIF orientation), as transformers' `load_image` does for URLs.
            return ImageOps.exif_transpose(image)
    except FileNotFoundError:
        raise ValueError(f"Image file not found: {path}") from None
    except Image.DecompressionBombError as error:
        raise ValueError(_too_large(path, error)) from None
    except OSError as error:
        raise ValueError(f"Could not read the image {path}: {error}") from None


def _too_large(name: str, error: Exception) -> str:
    """What to say of an image past PIL's decompression-bomb limit."""
    return (
        f"The image {name} is too large to open safely: {error} (PIL's guard against decompression bombs, "
        "Image.MAX_IMAGE_PIXELS). If you trust the file, raise the limit before loading it: "
        "`PIL.Image.MAX_IMAGE_PIXELS = None` (or a larger number of pixels)."
    )


def _fetch_image(url: str, timeout: float = 30.0) -> Image.Image:
    """An image from an http(s) URL (upright, as transformers' `load_image`); an unreachable host, an HTTP error or
    a reply that is no image is an error naming the URL and what went wrong."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # follows redirects
            content, kind = response.read(), response.headers.get("content-type", "unknown")
    except urllib.error.HTTPError as error:
        raise ValueError(f"Could not fetch the image {url}: HTTP {error.code} {error.reason}.") from None
    except (urllib.error.URLError, OSError) as error:  # no such host, refused, timed out
        reason = getattr(error, "reason", error)
        raise ValueError(f"Could not fetch the image {url}: {reason}.") from None
    try:
        with Image.open(io.BytesIO(content)) as image:
            return ImageOps.exif_transpose(image)
    except Image.DecompressionBombError as error:
        raise ValueError(_too_large(url, error)) from None
    except OSError:
        raise ValueError(f"{url} did not return an image (content type {kind}, {len(content)} bytes).") from None


def _array_to_pil(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"An image array must be HxW or HxWx3 (or 4); got shape {array.shape}.")
    if array.size == 0:
        raise ValueError(f"Got an empty image (array of shape {array.shape}).")
    # As transformers reads pixel arrays: signed integers are 0..255 (numpy's default int, from np.array(img).astype(int)),
    # floats are 0..1; values outside those ranges are an error rather than a near-white picture.
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype.kind == "u" and array.dtype != np.uint8:  # 16-bit and wider: by the type's range
        array = np.rint(array.astype(np.float64) * (255 / np.iinfo(array.dtype).max)).astype(np.uint8)
    elif array.dtype.kind == "i":
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise ValueError(
                f"An integer image array holds values in [{low}, {high}]; integer pixels must lie in 0..255. Pass "
                "uint8 values, an unsigned 16-bit array (scaled by its type's range), or floats in 0..1."
            )
        array = array.astype(np.uint8)
    elif array.dtype.kind == "f":
        low, high = float(array.min()), float(array.max())
        if not (math.isfinite(low) and math.isfinite(high)) or low < -1e-3 or high > 1 + 1e-3:
            raise ValueError(
                f"A float image array holds values in [{low:g}, {high:g}]; float pixels must lie in 0..1 (divide "
                "0..255 values by 255, or pass them as uint8)."
            )
        array = np.clip(np.rint(array.astype(np.float64) * 255), 0, 255).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise TypeError(
            f"Unsupported image array dtype {array.dtype}: pass uint8, integers in 0..255 or floats in 0..1."
        )
    return Image.fromarray(array)


class PVCImageProcessorKwargs(TypedDict, total=False):
    """Settings that `from_pretrained(..., **kwargs)` may override."""

    image_size: int
    min_tiles: int
    max_tiles: int
    size: dict
    use_thumbnail: bool
    do_convert_rgb: bool
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    image_mean: list
    image_std: list
    num_frames: int
    video_max_tiles: int


# transformers' standard pixel options that PVC honours, at construction and in a call (see `PVCImageProcessor`)
NORMALISATION = ("do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std")
LOADING = ("do_convert_rgb", "input_data_format")  # how an image is read (see `PVCImageProcessor.load`)
STANDARD_OPTIONS = (*NORMALISATION, *LOADING, "device")
# transformers' standard options that tiling replaces: refused, never silently ignored (`size` is honoured as a tile
# budget, see `PVCImageProcessor.size`)
TILING_REPLACES = (
    "do_resize",
    "default_to_square",
    "resample",
    "do_center_crop",
    "crop_size",
    "do_pad",
    "pad_size",
    "data_format",
    "disable_grouping",
    "image_seq_length",
)


BACKENDS = ("torchvision", "pil")


@functools.cache
def torchvision_loads() -> bool:
    """Whether torchvision is installed and loads beside this torch (a torchvision built for another torch fails)."""
    try:
        from torchvision.transforms.v2 import functional  # noqa: F401
    except Exception:  # not installed (ImportError), or built for another torch (RuntimeError, OSError)
        return False
    return True


def _torchvision_functional():
    """torchvision's functional transforms, for the torchvision backend (imported only there: torchvision is
    optional)."""
    try:
        from torchvision.transforms.v2 import functional
    except ImportError:
        raise ImportError(
            "The torchvision backend needs torchvision: pip install torchvision, or use backend='pil'."
        ) from None
    return functional


def resolve_backend(backend: str | None = None, use_fast: bool | None = None) -> str:
    """The pixel backend asked for (`backend`, or transformers' older `use_fast`), else torchvision where it loads,
    else PIL, as transformers picks its processors' backends."""
    if use_fast is not None:
        implied = "torchvision" if use_fast else "pil"
        if backend is not None and backend != implied:
            raise ValueError(f"use_fast={use_fast} asks for the {implied} backend but backend={backend!r}: give one.")
        backend = implied
    if backend is None:
        return "torchvision" if torchvision_loads() else "pil"
    if backend not in BACKENDS:
        raise ValueError(f"Unknown backend {backend!r}; PVC's image processor has {', '.join(BACKENDS)}.")
    if backend == "torchvision" and not torchvision_loads():
        raise ImportError(
            "backend='torchvision' needs torchvision, which is not installed here or does not load beside this torch "
            f"{torch.__version__}: pip install the torchvision built for it, or use backend='pil'."
        )
    return backend


def refuse_tiling_options(options, where: str):
    refused = sorted(set(options) & set(TILING_REPLACES))
    if refused:
        raise ValueError(
            f"{where} does not take {refused}: PVC cuts every image into square tiles of `image_size` pixels (InternVL's "
            "dynamic resolution, BICUBIC), channels first. Set image_size, min_tiles / max_tiles or use_thumbnail instead."
        )


class PixelBackend:
    """The `backend` setting of PVC's image and video processors."""

    @property
    def backend(self) -> str:
        """How pixels are resized and normalised: "torchvision" (batched tensor operations) or "pil" (PIL's resize).
        Chosen as transformers chooses for its own processors: `backend=` (or the older `use_fast=`) at construction
        or in `from_pretrained`, else torchvision when it is installed and loads, else PIL. Asking for torchvision
        where it does not load is an error. A run-time choice, not saved. Both give InternVL2's pixels within the
        rounding of two bicubic implementations."""
        return self._backend

    @backend.setter
    def backend(self, backend: str):
        self._backend = resolve_backend(backend)

    @property
    def is_fast(self) -> bool:
        return self.backend == "torchvision"


class PVCImageProcessor(PixelBackend, ImageProcessingMixin):
    r"""
    Images to PVC's pixel inputs (videos: `PVCVideoProcessor`, which cuts frames into tiles with this class).

    Args:
        image_size (`int`, defaults to 448): tile side.
        min_tiles, max_tiles (`int`, defaults to 1 and 12): bounds of the tile grid of an image.
        size (`dict`, *optional*): `max_tiles` given as transformers' `size`, the largest shape an image is resized to
            before tiling: `{"height": rows * image_size, "width": columns * image_size}` allows rows x columns tiles
            (see the `size` property). Give `size` or `max_tiles`, not both.
        use_thumbnail (`bool`, defaults to `True`): append a whole-image tile when an image has several tiles.
        do_convert_rgb (`bool`, defaults to `True`): convert every image to RGB; with `False` an image that is not
            RGB already is an error (the model takes 3 channels).
        do_rescale, rescale_factor (defaults `True`, 1/255): scale 8-bit pixels to 0..1.
        do_normalize, image_mean, image_std (defaults `True`, ImageNet): normalise each channel.
        num_frames, video_max_tiles (defaults 16 and 1): the video settings of checkpoints saved before
            `PVCVideoProcessor` had its own configuration; a processor without one takes them from here.
        backend (`str`, *optional*): "torchvision" or "pil" (see `backend`).
    """

    # The image inputs (the video processor declares the video ones).
    model_input_names = ["pixel_values", "image_num_tiles"]
    valid_kwargs = PVCImageProcessorKwargs

    def __init__(
        self,
        image_size=448,
        min_tiles=1,
        max_tiles=None,
        use_thumbnail=True,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        num_frames=16,
        video_max_tiles=1,
        do_convert_rgb=True,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        **kwargs,
    ):
        refuse_tiling_options(kwargs, type(self).__name__)
        size = kwargs.pop("size", None)
        backend = resolve_backend(kwargs.pop("backend", None), kwargs.pop("use_fast", None))
        super().__init__(**kwargs)
        self._backend = backend
        self.image_size = image_size
        self.min_tiles = min_tiles
        self.max_tiles = self.tile_limit(max_tiles, size, default=12)
        self.use_thumbnail = use_thumbnail
        self.do_convert_rgb = do_convert_rgb
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.num_frames = num_frames
        self.video_max_tiles = video_max_tiles

    def to_dict(self) -> dict:
        output = super().to_dict()
        output.pop("_backend", None)  # chosen where the processor is loaded
        return output

    @classmethod
    def from_dict(cls, image_processor_dict: dict, **kwargs):
        """As transformers' `from_dict`; a `size` given here replaces the saved `max_tiles` (it is another way to
        give it), and `backend` / `use_fast` choose the backend (see `backend`)."""
        if kwargs.get("size") is not None:
            image_processor_dict = {key: value for key, value in image_processor_dict.items() if key != "max_tiles"}
        # not among the settings transformers routes to the constructor (a tokenizer has a `backend` too)
        choice = {key: kwargs.pop(key) for key in ("backend", "use_fast") if key in kwargs}
        return super().from_dict({**image_processor_dict, **choice}, **kwargs)

    @property
    def size(self) -> dict:
        """The largest size an image is resized to before it is cut into tiles, `{"height", "width"}`: the grid of
        at most `max_tiles` tiles that holds the most (`largest_grid`; 1344 x 1792 for 12 tiles of 448). It follows
        from `image_size` and `max_tiles` and is not saved. vLLM profiles its largest image at this size and sizes its
        memory for image features from it; a square image would give fewer tiles (3 x 3 of 12).

        Setting it (or `from_pretrained(..., size=...)`, or `size=` in a call) sets the tile budget: a shape of
        rows x columns whole tiles allows rows * columns tiles, whichever way round an image is cut."""
        return _grid_size(self.max_tiles, self.image_size)

    @size.setter
    def size(self, size: dict):
        self.max_tiles = tiles_in(size, self.image_size)

    def tile_limit(self, max_tiles: int | None = None, size: dict | None = None, default: int | None = None) -> int:
        """The tile limit a call (or the constructor) asks for: `max_tiles`, or `size` as a tile budget (see the
        `size` property), or `default` (the processor's `max_tiles`)."""
        if size is not None:
            budget = tiles_in(size, self.image_size)
            if max_tiles is not None and max_tiles != budget:
                raise ValueError(
                    f"size={dict(size)} allows {budget} tiles of {self.image_size}px but max_tiles={max_tiles}: give "
                    "one of them."
                )
            return budget
        return default if max_tiles is None else max_tiles

    # ---------------------------------------------------------------------------------------------------- images

    def tiles(self, image: Image.Image, max_tiles: int | None = None) -> list[Image.Image]:
        """The tiles of one RGB image: the grid row by row, then the thumbnail (when there is more than one)."""
        size = self.image_size
        columns, rows, thumbnail = self.layout(image.width, image.height, max_tiles)
        resized = image.resize((columns * size, rows * size), Image.BICUBIC)
        tiles = [
            resized.crop((c * size, r * size, (c + 1) * size, (r + 1) * size))
            for r in range(rows)
            for c in range(columns)
        ]
        if thumbnail:
            tiles.append(image.resize((size, size), Image.BICUBIC))
        return tiles

    def layout(self, width: int, height: int, max_tiles: int | None = None) -> tuple[int, int, bool]:
        """The (columns, rows) tile grid of an image of this size, and whether a thumbnail follows it (with
        `use_thumbnail`, when the grid has more than one tile): what `tiles` cuts and `num_tiles` counts."""
        max_tiles = self.max_tiles if max_tiles is None else max_tiles
        if not 1 <= self.min_tiles <= max_tiles:
            raise ValueError(f"Need 1 <= min_tiles ({self.min_tiles}) <= max_tiles ({max_tiles}).")
        columns, rows = tile_grid(width, height, self.min_tiles, max_tiles, self.image_size)
        return columns, rows, self.use_thumbnail and columns * rows > 1

    def num_tiles(self, width: int, height: int, max_tiles: int | None = None) -> int:
        """How many tiles `tiles` cuts an image of this size into, without reading it."""
        columns, rows, thumbnail = self.layout(width, height, max_tiles)
        return columns * rows + int(thumbnail)

    def num_frame_tiles(self, width: int, height: int, max_tiles: int | None = None) -> int:
        """How many tiles a video frame of this size becomes (`video_max_tiles` by default; 1: one resized tile)."""
        max_tiles = self.video_max_tiles if max_tiles is None else max_tiles
        return 1 if max_tiles == 1 else self.num_tiles(width, height, max_tiles)

    def to_tensor(self, tiles: list[Image.Image], **normalisation) -> torch.Tensor:
        """RGB tiles -> [len, 3, size, size] float32, rescaled and normalised (the settings, or `normalisation`:
        do_rescale, rescale_factor, do_normalize, image_mean, image_std)."""
        pixels = torch.from_numpy(np.stack([np.asarray(tile) for tile in tiles]))  # [n, S, S, 3] uint8
        return self.normalised(pixels.permute(0, 3, 1, 2), **normalisation)

    def normalised(self, pixels, **normalisation) -> torch.Tensor:
        """8-bit tiles -> float32 [n, 3, S, S], contiguous, rescaled and normalised in one multiply-add:
        x * (rescale / std) - mean / std (the settings, or `normalisation`). `pixels`: a tensor [n, 3, S, S], or
        pieces [..., 3, S, S] in any memory layout, copied in order into the one output."""
        settings = {key: normalisation.get(key, getattr(self, key)) for key in NORMALISATION}
        scale = torch.full((3,), float(settings["rescale_factor"]) if settings["do_rescale"] else 1.0)
        shift = torch.zeros(3)
        if settings["do_normalize"]:
            std = torch.tensor(settings["image_std"], dtype=torch.float32)
            scale, shift = scale / std, -torch.tensor(settings["image_mean"], dtype=torch.float32) / std
        pieces = [pixels] if isinstance(pixels, torch.Tensor) else list(pixels)
        total = sum(piece.shape[:-3].numel() for piece in pieces)
        output = torch.empty((total, *pieces[0].shape[-3:]), dtype=torch.float32)
        offset = 0
        for piece in pieces:
            count = piece.shape[:-3].numel()
            output[offset : offset + count].view(piece.shape).copy_(piece)
            offset += count
        return output.mul_(scale.view(1, 3, 1, 1)).add_(shift.view(1, 3, 1, 1))

    def load(self, image, do_convert_rgb=None, input_data_format=None) -> Image.Image:
        """One image as the RGB picture the tiles are cut from (see `to_pil`)."""
        convert = self.do_convert_rgb if do_convert_rgb is None else do_convert_rgb
        return to_pil(image, input_data_format=input_data_format, convert_rgb=convert)

    def preprocess_images(self, images, max_tiles: int | None = None, **options) -> dict:
        """`pixel_values` [total_tiles, 3, S, S] and `image_num_tiles` [num_images]; `options`: the standard ones of
        `STANDARD_OPTIONS` (see the class)."""
        loading = {key: options.pop(key) for key in LOADING if key in options}
        pictures = [self.load(image, **loading) for image in _flatten(images)]
        if self.backend == "torchvision":
            pieces, counts = self.tile_tensors([_as_chw(picture) for picture in pictures], max_tiles)
            return {"pixel_values": self.normalised(pieces, **options), "image_num_tiles": torch.tensor(counts)}
        tiles_per_image = [self.tiles(picture, max_tiles) for picture in pictures]
        return {
            "pixel_values": self.to_tensor([tile for tiles in tiles_per_image for tile in tiles], **options),
            "image_num_tiles": torch.tensor([len(tiles) for tiles in tiles_per_image]),
        }

    def tile_tensors(self, pictures: list[torch.Tensor], max_tiles: int | None = None) -> tuple[list, list[int]]:
        """The torchvision backend's `tiles`: 8-bit RGB pictures [3, H, W] -> the pieces of their tiles, in order
        (each picture's grid row by row, as a view [rows, columns, 3, S, S] of its resized picture, then its
        thumbnail [1, 3, S, S]; `normalised` copies them out once), and the number of tiles of each. Pictures of one
        size are resized together, in one batched call (bicubic with antialiasing, as PIL's)."""
        tvF = _torchvision_functional()
        size, bicubic = self.image_size, tvF.InterpolationMode.BICUBIC
        groups: dict[tuple, list[int]] = {}
        for index, picture in enumerate(pictures):
            groups.setdefault(tuple(picture.shape[1:]), []).append(index)
        pieces: list = [None] * len(pictures)
        counts = [0] * len(pictures)
        for (height, width), members in groups.items():
            columns, rows, thumbnail = self.layout(width, height, max_tiles)
            # [B, H, W, 3] memory seen as [B, 3, H, W]: channels-last, as torchvision's fast resizing kernels read it
            batch = torch.stack([pictures[index].permute(1, 2, 0) for index in members]).permute(0, 3, 1, 2)
            grid = tvF.resize(batch, [rows * size, columns * size], interpolation=bicubic, antialias=True)
            # [B, 3, rows * S, columns * S] -> [B, rows, columns, 3, S, S], a view
            tiles = grid.unflatten(2, (rows, size)).unflatten(4, (columns, size)).permute(0, 2, 4, 1, 3, 5)
            small = tvF.resize(batch, [size, size], interpolation=bicubic, antialias=True) if thumbnail else None
            for position, index in enumerate(members):
                pieces[index] = [tiles[position]] + ([small[position : position + 1]] if thumbnail else [])
                counts[index] = columns * rows + int(thumbnail)
        return [piece for parts in pieces for piece in parts], counts

    # ---------------------------------------------------------------------------------------------------- videos

    def _tile_frame(self, frame: Image.Image, max_tiles: int) -> list[Image.Image] | torch.Tensor:
        """A video frame's tiles: PIL tiles, or with the torchvision backend pieces of 8-bit tiles (see
        `tile_tensors`)."""
        if self.backend == "torchvision":
            picture = _as_chw(frame)
            if max_tiles == 1:
                tvF = _torchvision_functional()
                size, bicubic = [self.image_size] * 2, tvF.InterpolationMode.BICUBIC
                return [tvF.resize(picture.unsqueeze(0), size, interpolation=bicubic, antialias=True)]
            return self.tile_tensors([picture], max_tiles)[0]
        if max_tiles == 1:
            return [frame.resize((self.image_size, self.image_size), Image.BICUBIC)]
        return self.tiles(frame, max_tiles)

    def sample_frames(self, video, num_frames=None, fps=None, max_frames=None, start=None, end=None, transform=None):
        """RGB frames of one video (a path, an http(s) or base64 data: URL, a list of frames, or an array/tensor
        [T, H, W, 3]).

        By default `num_frames` frames at the middles of equal segments, as InternVL2's and PVC's `load_video`
        picks them: the span from the window's first frame a to its last frame b is cut into `num_frames` segments
        of length s = (b - a) / num_frames, and frame a + int(s / 2 + round(s * k)) is kept, k = 0 .. num_frames - 1.
        With `fps`, frames every 1/fps seconds instead (each frame at most once: an fps above the video's own gives
        every frame), at most `max_frames` (beyond that, `max_frames` by the default rule). Frames come upright (the
        container's display matrix applied: rotations and mirrors). `start`/`end` (seconds) restrict a video file to
        the frames nearest those times (at a constant rate, round(start * rate) .. round(end * rate), as `load_video`).
        A variable-frame-rate file is sampled evenly in time (see `read_video`). Asked for as many frames as the video
        (or window) has, each frame comes once; asked for more, frames repeat evenly, in order. Frames given in memory
        are sampled by the same rule as a file; pass `num_frames=len(frames)` to keep them all. With `transform`, its
        result for each frame instead of the frame, computed as the frame is decoded (see `read_video`).
        """
        num_frames = self.num_frames if num_frames is None else num_frames
        check_sampling(num_frames, fps, max_frames, start, end)
        if isinstance(video, (str, os.PathLike)):
            return read_video(str(video), num_frames, fps, max_frames, start, end, transform)
        frames = _frames_in_memory(video)
        if start is not None or end is not None:
            raise ValueError("start/end select a time window of a video file; slice frames given in memory instead.")
        indices = sample_indices(len(frames), num_frames, None, None, max_frames)
        show, picked = transform or (lambda frame: frame), {}
        for index in indices:  # a frame picked twice is read once
            if index not in picked:
                picked[index] = show(to_pil(frames[index]))
        return [picked[index] for index in indices]

    # ---------------------------------------------------------------------------------------------------- call

    def __call__(self, images=None, videos=None, return_tensors="pt", **kwargs) -> BatchFeature:
        """Images -> a `BatchFeature` of `pixel_values` and `image_num_tiles`. Options: `max_tiles` or `size` (the tile
        limit, see `size`), and transformers' standard `do_convert_rgb`, `input_data_format`, `do_rescale`,
        `rescale_factor`, `do_normalize`, `image_mean`, `image_std`, `device`. Any other option is an error. Videos
        go to `PVCVideoProcessor` (`PVCProcessor.video_processor`, or `PVCVideoProcessor.from_image_processor`)."""
        if videos is not None:
            raise TypeError(
                "PVCImageProcessor takes images; videos go to PVCVideoProcessor: processor.video_processor(videos), "
                "or PVCVideoProcessor.from_image_processor(image_processor) for one with this processor's settings."
            )
        refuse_tiling_options(kwargs, type(self).__name__)
        known = {"max_tiles", "size", *STANDARD_OPTIONS}
        if set(kwargs) - known:
            raise TypeError(
                f"Unexpected arguments: {sorted(set(kwargs) - known)}; options: {', '.join(sorted(known))}."
            )
        device = kwargs.pop("device", None)
        standard = {key: kwargs.pop(key) for key in STANDARD_OPTIONS if key in kwargs}
        max_tiles = self.tile_limit(kwargs.pop("max_tiles", None), kwargs.pop("size", None))
        data = self.preprocess_images(images, max_tiles, **standard) if images is not None else {}
        output = BatchFeature(data=data, tensor_type=return_tensors)
        return output.to(device) if device is not None else output

    preprocess = __call__


def tiles_in(size, tile_size: int) -> int:
    """The number of tiles a `size` `{"height", "width"}` of whole tiles holds (the inverse of `_grid_size`)."""
    if not (isinstance(size, Mapping) and set(size) == {"height", "width"}):
        raise ValueError(
            f"size must be {{'height': ..., 'width': ...}} in pixels (the largest shape an image is tiled at); got "
            f"{size!r}. Or set max_tiles."
        )
    height, width = size["height"], size["width"]
    if not all(isinstance(side, int) and side >= tile_size and side % tile_size == 0 for side in (height, width)):
        raise ValueError(
            f"size={dict(size)}: PVC cuts images into square tiles of {tile_size}px, so height and width must be whole "
            f"multiples of {tile_size} (rows x columns tiles: {{'height': 2 * {tile_size}, 'width': 3 * {tile_size}}} "
            "allows 6). Or set max_tiles."
        )
    return (height // tile_size) * (width // tile_size)


def _as_chw(picture: Image.Image) -> torch.Tensor:
    """An RGB picture as an 8-bit tensor [3, H, W] (a view of HWC memory: channels-last, as torchvision's fast
    resizing kernels read it)."""
    return torch.from_numpy(np.array(picture)).permute(2, 0, 1)


def _grid_size(max_tiles: int, tile_size: int) -> dict:
    columns, rows = largest_grid(max_tiles)
    return {"height": rows * tile_size, "width": columns * tile_size}


def _frames_in_memory(video):
    if isinstance(video, torch.Tensor):
        video = video.detach().cpu()
        if video.ndim == 4 and video.shape[1] in (1, 3) and video.shape[-1] not in (1, 3):
            video = video.permute(0, 2, 3, 1)  # [T, C, H, W] -> [T, H, W, C]
        video = video.numpy()
    if isinstance(video, np.ndarray):
        if video.ndim not in (3, 4):
            raise ValueError(f"A video array must be [T, H, W, 3] (or grey, [T, H, W]); got shape {video.shape}.")
        return list(video)
    if isinstance(video, (list, tuple)):
        return list(video)
    raise TypeError(
        f"Unsupported video type {type(video).__name__}: pass a path, a list of frames or an array [T, H, W, 3]."
    )


def _flatten(images) -> list:
    """A single image or a (nested) list of images, as a flat list in order."""
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in _flatten(item)]
    return [images]


def _flatten_videos(videos) -> list:
    """One video or a (nested) list of videos. A list whose items are frames (images) is one video; an array or tensor
    [N, T, H, W, C] is N videos."""
    if isinstance(videos, (np.ndarray, torch.Tensor)) and videos.ndim == 5:
        return list(videos)
    if isinstance(videos, (np.ndarray, torch.Tensor)) and videos.ndim == 3 and videos.shape[-1] in (3, 4):
        raise ValueError(
            f"A video array of shape {tuple(videos.shape)} reads as one picture [H, W, C]: pass a video as [T, H, W, 3] "
            "(a grey video as [T, H, W]), or one frame as [1, H, W, 3]."
        )
    if isinstance(videos, (str, os.PathLike, np.ndarray, torch.Tensor)):
        return [videos]
    if isinstance(videos, (list, tuple)) and videos and all(_is_frame(item) for item in videos):
        return [list(videos)]
    if isinstance(videos, (list, tuple)):
        return [video for item in videos for video in _flatten_videos(item)]
    raise TypeError(
        f"Unsupported video type {type(videos).__name__}: pass a path, a list of frames or an array [T, H, W, 3]."
    )


# Files read as pictures: a list of them is one video of frames (as transformers' chat templates accept), not videos.
PICTURE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def _is_frame(item) -> bool:
    if isinstance(item, (str, os.PathLike)):
        return str(item).lower().endswith(PICTURE_SUFFIXES)
    return isinstance(item, Image.Image) or (isinstance(item, (np.ndarray, torch.Tensor)) and item.ndim in (2, 3))


# Saving writes the code files and the `auto_map` beside the weights, however this file was imported.
PVCImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = ["PVCImageProcessor", "tile_grid"]
