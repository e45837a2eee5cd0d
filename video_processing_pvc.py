"""PVCVideoProcessor: videos to PVC's pixel inputs, as one of transformers' video processors.

A video becomes `num_frames` frames sampled as InternVL2's and PVC's own `load_video` samples them (the middles of
equal segments; see `video_decoding_pvc.sample_indices`), or frames every 1/fps seconds, each frame one resized tile
(or `video_max_tiles` tiles, InternVL's dynamic tiling of every frame). Files and URLs are decoded by
`video_decoding_pvc.read_video` (PyAV), frames in memory are sampled by the same rule; the pixels are the image
processor's (`PVCImageProcessor`: torchvision where it loads, else PIL), so a frame and an image of the same picture
give the same tile.

It is a transformers `BaseVideoProcessor`: saved as `video_preprocessor_config.json` (or inside the processor's
`processor_config.json`), loaded by `AutoVideoProcessor.from_pretrained(..., trust_remote_code=True)`, with
`VideoMetadata` in (`video_metadata=`) and out (`return_metadata=True`) and `sample_frames(metadata, ...)` giving the
indices to keep. It works without torchvision too (PIL and PyAV), unlike transformers' own video processors.
"""

import os
from collections.abc import Mapping

import numpy as np
import torch
from transformers import BatchFeature
from transformers.processing_utils import VideosKwargs
from transformers.video_processing_utils import BaseVideoProcessor
from transformers.video_utils import VideoMetadata

from .image_processing_pvc import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LOADING,
    NORMALISATION,
    PixelBackend,
    PVCImageProcessor,
    _flatten_videos,
    _frames_in_memory,
    _grid_size,
    refuse_tiling_options,
    resolve_backend,
    tiles_in,
    to_pil,
)
from .video_decoding_pvc import check_sampling, frame_window, read_video, sample_indices


class PVCVideoProcessorKwargs(VideosKwargs, total=False):
    """PVC's video options beside transformers' (`num_frames`, `fps`, `do_sample_frames`, `video_metadata`,
    `return_metadata` and the pixel ones)."""

    max_frames: int | None
    start: int | float | None
    end: int | float | None
    video_max_tiles: int | None


# What a PVCVideoProcessor is configured with (saved), with their defaults.
SETTINGS = {
    "image_size": 448,
    "min_tiles": 1,
    "use_thumbnail": True,
    "num_frames": 16,
    "fps": None,
    "max_frames": None,
    "video_max_tiles": 1,
    # None samples, as True does. Left unset so that vLLM, which asks for video metadata from a processor whose
    # do_sample_frames is set and then hands it frames sampled by vLLM's own reader, gives PVC the frames it decoded
    # and PVC samples them by the authors' rule (see the README's serving section).
    "do_sample_frames": None,
    "do_convert_rgb": True,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": list(IMAGENET_MEAN),
    "image_std": list(IMAGENET_STD),
}
# What one call takes besides the settings.
CALL_OPTIONS = ("start", "end", "size", "video_metadata", "return_metadata", "device", "input_data_format")
# Keys a saved configuration holds that are no setting: the type, the remote-code map, and the image processor's
# own tile limit (a checkpoint without a video configuration is read from the image processor's).
NOT_SETTINGS = ("video_processor_type", "image_processor_type", "processor_class", "auto_map", "max_tiles")


class PVCVideoProcessor(PixelBackend, BaseVideoProcessor):
    r"""
    Videos to PVC's pixel inputs: `pixel_values_videos` [total_frames * tiles, 3, S, S] (frame-major, every frame's
    tiles in turn), `video_num_frames` and `video_num_tiles` (tiles per frame) [num_videos].

    Args:
        image_size (`int`, defaults to 448): tile side.
        num_frames (`int`, defaults to 16): frames sampled from a video (the authors' rule, see `sample_frames`).
        fps (`float`, *optional*): sample a frame every 1/fps seconds instead (files, or frames with
            `video_metadata` giving their rate), at most `max_frames`.
        max_frames (`int`, *optional*): a cap on the frames kept.
        video_max_tiles (`int`, defaults to 1): tile grid bound for each frame (1: one resized tile); `size` gives
            it as a shape, as for `PVCImageProcessor`.
        min_tiles, use_thumbnail: the tiling of frames cut into several tiles (see `PVCImageProcessor`).
        do_sample_frames (`bool`, *optional*): unset or `True`, frames are sampled (files and frames in memory alike);
            `False` keeps frames given in memory as given.
        do_convert_rgb, do_rescale, rescale_factor, do_normalize, image_mean, image_std: as transformers'.
        backend (`str`, *optional*): "torchvision" or "pil", as `PVCImageProcessor.backend` (not saved).
    """

    model_input_names = ["pixel_values_videos", "video_num_frames", "video_num_tiles"]
    valid_kwargs = PVCVideoProcessorKwargs

    def __init__(self, **kwargs):
        refuse_tiling_options(kwargs, type(self).__name__)
        backend = resolve_backend(kwargs.pop("backend", None), kwargs.pop("use_fast", None))
        size, explicit_tiles = kwargs.pop("size", None), kwargs.get("video_max_tiles")
        settings = {key: kwargs.pop(key, default) for key, default in SETTINGS.items()}
        unknown = sorted(set(kwargs) - set(NOT_SETTINGS))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unknown settings {unknown}; settings: {', '.join(SETTINGS)}.")
        # set first: transformers' initialisation reads what is set (and sets its own defaults for the rest)
        for key, value in settings.items():
            setattr(self, key, list(value) if isinstance(value, (list, tuple)) else value)
        self._backend = backend
        super().__init__(**{key: value for key, value in kwargs.items() if key == "processor_class"})
        for key, value in settings.items():  # as given, not as transformers' initialisation standardised them
            setattr(self, key, list(value) if isinstance(value, (list, tuple)) else value)
        if size is not None:
            self.video_max_tiles = _frame_tiles(size, explicit_tiles, settings)

    @classmethod
    def from_dict(cls, video_processor_dict: dict, **kwargs):
        """As transformers' `from_dict`; `backend` / `use_fast` choose the backend (see `backend`)."""
        choice = {key: kwargs.pop(key) for key in ("backend", "use_fast") if key in kwargs}
        return super().from_dict({**video_processor_dict, **choice}, **kwargs)

    @classmethod
    def from_image_processor(cls, image_processor: PVCImageProcessor, **overrides) -> "PVCVideoProcessor":
        """The video processor of an image processor's settings (`num_frames`, `video_max_tiles`, the tile side and
        the pixel settings): what a checkpoint without a video configuration of its own gets."""
        settings = {key: getattr(image_processor, key) for key in SETTINGS if hasattr(image_processor, key)}
        return cls(**settings, backend=image_processor.backend, **overrides)

    # ---------------------------------------------------------------------------------------------------- settings

    @property
    def size(self) -> dict:
        """The largest size a frame is resized to before it is cut into tiles, by `video_max_tiles` (see
        `PVCImageProcessor.size`); setting it sets `video_max_tiles`."""
        return _grid_size(self.video_max_tiles, self.image_size)

    @size.setter
    def size(self, size):
        if size is None or not hasattr(self, "image_size"):  # transformers' initialisation clearing it
            return
        self.video_max_tiles = tiles_in({"height": size["height"], "width": size["width"]}, self.image_size)

    def to_dict(self) -> dict:
        """The settings (what `__init__` takes back), the type and the remote-code map."""
        output = {key: getattr(self, key) for key in SETTINGS}
        output["video_processor_type"] = type(self).__name__
        if getattr(self, "auto_map", None) is not None:
            output["auto_map"] = self.auto_map
        return output

    def call_options(self, **given) -> dict:
        """The settings a call uses: those given (None is not given), else this processor's. A frame count given wins
        over a saved rate; `size` gives the frames' tile limit."""
        options = {key: getattr(self, key) if given.get(key) is None else given[key] for key in SETTINGS}
        if given.get("num_frames") is not None and given.get("fps") is None:
            options["fps"] = None
        if given.get("size") is not None:
            options["video_max_tiles"] = _frame_tiles(given["size"], given.get("video_max_tiles"), options)
        return options

    def frames_kept(self, total_num_frames: int, **options) -> int:
        """How many frames a call with `options` (as `call_options` returns them) keeps of a video of this many."""
        if options["do_sample_frames"] is False:
            return total_num_frames
        sampling = [options[key] for key in ("num_frames", "fps", "max_frames")]
        return len(self._indices(VideoMetadata(total_num_frames), *sampling, None, None))

    def pixels(self, **options) -> PVCImageProcessor:
        """The image processor that makes the frames' tiles: this processor's tiling, normalisation and backend
        (`options` override the tiling and normalisation settings)."""
        keys = ("image_size", "min_tiles", "use_thumbnail", "do_convert_rgb", *NORMALISATION)
        settings = {key: options.get(key, getattr(self, key)) for key in keys}
        # its own image tile limit is never used: frames are tiled by `video_max_tiles`, given to each call
        return PVCImageProcessor(**settings, max_tiles=max(1, settings["min_tiles"]), backend=self.backend)

    # ---------------------------------------------------------------------------------------------------- sampling

    def sample_frames(
        self,
        metadata: VideoMetadata | Mapping,
        num_frames: int | None = None,
        fps: float | None = None,
        max_frames: int | None = None,
        start: float | None = None,
        end: float | None = None,
        **kwargs,
    ) -> np.ndarray:
        """The indices of the frames to keep among `metadata.total_num_frames` (transformers' `sample_frames`).

        By default `num_frames` frames at the middles of equal segments, as InternVL2's and PVC's `load_video` picks
        them: the frames a .. b of the window in `num_frames` segments of length s = (b - a) / num_frames, frame
        a + int(s / 2 + round(s * k)) for k = 0 .. num_frames - 1. With `fps`, a frame every 1/fps seconds (each
        frame at most once), at most `max_frames`. `start`/`end` (seconds) select the frames round(start * rate) ..
        round(end * rate). `fps`, `start` and `end` need the frame rate, `metadata.fps`. Asked for as many frames as
        the window has, or more, each frame comes once, or repeats evenly, in order."""
        num_frames = self.num_frames if num_frames is None else num_frames
        fps = self.fps if fps is None else fps
        max_frames = self.max_frames if max_frames is None else max_frames
        return self._indices(metadata, num_frames, fps, max_frames, start, end)

    def _indices(self, metadata, num_frames, fps, max_frames, start, end) -> np.ndarray:
        """`sample_frames` with every option as given (None is none, not this processor's setting)."""
        check_sampling(num_frames, fps, max_frames, start, end)
        total, rate = metadata["total_num_frames"], metadata.get("fps")
        timed = {"fps": fps, "start": start, "end": end}
        if any(value is not None for value in timed.values()) and not rate:
            given = ", ".join(f"{key}={value}" for key, value in timed.items() if value is not None)
            raise ValueError(
                f"{given} samples by time, which needs the video's frame rate, and none is known for these frames: "
                "pass video_metadata=VideoMetadata(total_num_frames=..., fps=...) (or {'fps': ...}) with them, or "
                "sample by num_frames."
            )
        first, last = frame_window(total, start, end, rate or 0.0, "the video")
        return np.array(
            [first + index for index in sample_indices(last - first + 1, num_frames, fps, rate, max_frames)]
        )

    def fetch_videos(self, video_url_or_urls, sample_indices_fn=None):
        """Videos (paths or URLs, or lists of them) decoded: `(videos, metadata)`, each video an array [T, H, W, 3] of
        the frames `sample_indices_fn(metadata=...)` picks, or every frame without it (as transformers' own
        `fetch_videos`), and its `VideoMetadata`."""
        if isinstance(video_url_or_urls, (list, tuple)):
            fetched = [self.fetch_videos(item, sample_indices_fn) for item in video_url_or_urls]
            return [video for video, _ in fetched], [metadata for _, metadata in fetched]

        def choose(total, rate):
            if sample_indices_fn is None:
                return range(total)
            return sample_indices_fn(metadata=VideoMetadata(total_num_frames=total, fps=rate or None))

        frames, metadata = read_video(str(video_url_or_urls), None, choose=choose, with_metadata=True)
        return np.stack([np.asarray(frame) for frame in frames]), VideoMetadata(**metadata)

    # ---------------------------------------------------------------------------------------------------- call

    def __call__(self, videos=None, **kwargs) -> BatchFeature:
        return self.preprocess(videos, **kwargs)

    def preprocess(self, videos, return_tensors="pt", **kwargs) -> BatchFeature:
        r"""
        Videos -> `pixel_values_videos`, `video_num_frames`, `video_num_tiles` (and `video_metadata`, one per video,
        with `return_metadata=True`).

        Args:
            videos: a path, an http(s) URL (downloaded once) or a base64 data: URL of a video file; its frames (a list
                of images or arrays, an array or tensor [T, H, W, 3], [T, 3, H, W] or grey [T, H, W]); or a list of
                these, or an array [N, T, H, W, 3] of N videos.
            Options: the settings (see the class) for this call, and `start` / `end` (seconds), `size` (the frames'
            tile limit as a shape), `video_metadata` (one `VideoMetadata` or dict per video: the frame rate of frames
            given in memory, for `fps`, `start` and `end`), `return_metadata`, `device`, `input_data_format`,
            `return_tensors`. Any other option is an error.
        """
        refuse_tiling_options(kwargs, type(self).__name__)
        if "max_tiles" in kwargs:
            raise TypeError("max_tiles is the images' tile limit; a video's frames take video_max_tiles.")
        known = {*SETTINGS, *CALL_OPTIONS}
        if set(kwargs) - known:
            raise TypeError(
                f"Unexpected arguments: {sorted(set(kwargs) - known)}; options: {', '.join(sorted(known))}."
            )
        options = self.call_options(**kwargs)
        sampling = {key: options[key] for key in ("num_frames", "fps", "max_frames")}
        window = {key: kwargs.get(key) for key in ("start", "end")}
        check_sampling(**sampling, **window)
        videos = _flatten_videos(videos)
        if not videos:
            raise ValueError("No video was given: pass a video (a file, a URL or its frames), or a list of them.")
        metadata = _per_video(kwargs.get("video_metadata"), len(videos))
        pixels = self.pixels(**options)
        loading = {key: kwargs[key] for key in LOADING if kwargs.get(key) is not None}
        loading["do_convert_rgb"] = options["do_convert_rgb"]
        tiles_per_frame = options["video_max_tiles"]

        def prepare(frame):  # each frame tiled as soon as it is decoded: full-resolution frames are not kept
            return pixels._tile_frame(pixels.load(frame, **loading), tiles_per_frame)

        outputs, frame_counts, tile_counts, metadata_out = [], [], [], []
        for video, given in zip(videos, metadata):
            if isinstance(video, (str, os.PathLike)):
                frames, found = self._read_file(video, options, window, prepare)
            else:
                frames, found = self._read_frames(video, given, options, window, prepare, explicit=kwargs)
            if pixels.backend == "torchvision":
                outputs.append(pixels.normalised([piece for frame in frames for piece in frame]))
            else:
                outputs.append(pixels.to_tensor([tile for frame in frames for tile in frame]))
            frame_counts.append(len(frames))
            tile_counts.append(outputs[-1].shape[0] // len(frames))
            metadata_out.append(found)
        data = {
            "pixel_values_videos": torch.cat(outputs),
            "video_num_frames": torch.tensor(frame_counts),
            "video_num_tiles": torch.tensor(tile_counts),
        }
        output = BatchFeature(data=data, tensor_type=return_tensors)
        if kwargs.get("return_metadata", self.return_metadata):
            output["video_metadata"] = metadata_out
        device = kwargs.get("device")
        return output.to(device) if device is not None else output

    def _read_file(self, video, options, window, prepare):
        if options["do_sample_frames"] is False:
            raise ValueError(
                "do_sample_frames=False keeps the frames of a video as given, but this video is a file or URL "
                f"({str(video)[:80]}): pass its frames, or leave do_sample_frames on to sample num_frames of them."
            )
        sampling = [options[key] for key in ("num_frames", "fps", "max_frames")]
        frames, metadata = read_video(str(video), *sampling, **window, transform=prepare, with_metadata=True)
        return frames, VideoMetadata(**metadata)

    def _read_frames(self, video, metadata, options, window, prepare, explicit):
        frames = _frames_in_memory(video)
        if not len(frames):
            raise ValueError("A video given as frames has no frames.")
        metadata = _as_metadata(metadata, len(frames))
        if options["do_sample_frames"] is not False:
            sampling = [options[key] for key in ("num_frames", "fps", "max_frames")]
            indices = [int(index) for index in self._indices(metadata, *sampling, *window.values())]
        else:
            keys = ("num_frames", "fps", "max_frames", "start", "end")
            asked = sorted(key for key in keys if explicit.get(key) is not None)
            if asked:
                raise ValueError(
                    f"do_sample_frames=False keeps every given frame; {', '.join(asked)} sample them. Pass one or the "
                    "other."
                )
            indices = list(range(len(frames)))
        picked = {}
        for index in indices:  # a frame picked twice is read once
            if index not in picked:
                picked[index] = prepare(to_pil(frames[index]))
        metadata.frames_indices = indices
        if metadata.duration is None and metadata.fps:
            metadata.duration = metadata.total_num_frames / metadata.fps
        metadata.height, metadata.width = (metadata.height, metadata.width) if metadata.height else _size(frames[0])
        return [picked[index] for index in indices], metadata


def _as_metadata(metadata, count: int) -> VideoMetadata:
    """The metadata of `count` frames given in memory: what `video_metadata` says (a `VideoMetadata` or a dict;
    keys that are no field of it are left out), or just their count. Frames that are a sample of a longer video
    (`frames_indices` as many as the frames, as transformers' `load_video` returns them) are sampled among
    themselves, their rate then unknown."""
    if metadata is None:
        return VideoMetadata(count)
    fields = set(VideoMetadata.__dataclass_fields__)
    metadata = VideoMetadata(**{key: value for key, value in dict(metadata).items() if key in fields})
    if metadata.total_num_frames == count:
        return metadata
    indices = metadata.frames_indices
    if indices is not None and len(indices) == count:  # frames sampled from a longer video
        return VideoMetadata(count, width=metadata.width, height=metadata.height, video_backend=metadata.video_backend)
    raise ValueError(
        f"video_metadata says {metadata.total_num_frames} frames, but the video given has {count} (and no "
        "frames_indices saying which of them these are): give the metadata of these frames, or leave it out."
    )


def _frame_tiles(size, video_max_tiles, options) -> int:
    """The frames' tile limit of a call that gives `size` (see `PVCVideoProcessor.size`)."""
    budget = tiles_in(size, options["image_size"])
    if video_max_tiles is not None and video_max_tiles != budget:
        raise ValueError(
            f"size={dict(size)} allows {budget} tiles of {options['image_size']}px per frame but "
            f"video_max_tiles={video_max_tiles}: give one of them."
        )
    return budget


def _per_video(metadata, count: int) -> list:
    """`video_metadata` as one entry (None, a VideoMetadata or a dict) per video."""
    if metadata is None:
        return [None] * count
    if isinstance(metadata, (VideoMetadata, Mapping)):
        metadata = [metadata]
    metadata = list(metadata)
    if len(metadata) != count:
        raise ValueError(f"video_metadata has {len(metadata)} entries for {count} videos: give one per video.")
    for entry in metadata:
        if entry is not None and "total_num_frames" not in entry:
            raise ValueError(f"video_metadata entries need total_num_frames (and fps to sample by time); got {entry}.")
    return metadata


def _size(frame) -> tuple[int, int]:
    picture = to_pil(frame)
    return picture.height, picture.width


# Saving writes the code files and the `auto_map` beside the configuration, however this file was imported.
PVCVideoProcessor.register_for_auto_class("AutoVideoProcessor")

__all__ = ["PVCVideoProcessor"]
