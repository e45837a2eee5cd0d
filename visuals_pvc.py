"""What the processor, the model and training agree on about visual inputs, in one place.

- The kinds: an image (`IMAGE`, placeholder `<image>`) is a static clip of `image_repeat` frames of its tiles; a
  video (`VIDEO`, `<video>`) is its frames, each of `tiles` tiles (1 by default).
- The token counts: `tokens_per_frame` `<IMG_CONTEXT>` tokens per frame and tile (`visual_tokens`).
- The per-item counts, in either of two layouts: `image_num_tiles` / `video_num_frames` / `video_num_tiles` (one entry
  per item) or the grid layout vLLM splits per item, one (t, h, w) row per item: `image_grid_thw` = (1, 1, tiles),
  `video_grid_thw` = (frames, 1, tiles) (`as_grids`).
- The text order of visuals in a batch holding both kinds: `visual_order`, 0 per image and 1 per video as their
  placeholders come (`visual_order`), and which items belong to which sample (`items_per_sample`).
- The model's one reading of all of these: `visual_layout`, called once where inputs enter the model, gives a
  `VisualLayout` of plain ints that the rest of the model passes along.

How many tiles an image gets is the image processor's (`PVCImageProcessor.num_tiles`, beside its tiling).
"""

from dataclasses import dataclass

import torch

IMAGE, VIDEO = 0, 1  # values of `visual_order`
PLACEHOLDER_KINDS = {"<image>": IMAGE, "<video>": VIDEO}
GRID_INPUTS = ("image_grid_thw", "video_grid_thw")


def visual_tokens(tokens_per_frame: int, image_repeat: int, kind: int, tiles: int, frames: int = 1) -> int:
    """The `<IMG_CONTEXT>` tokens of one item: an image of `tiles` tiles (a static clip of `image_repeat` frames),
    or a video of `frames` frames of `tiles` tiles each."""
    return tokens_per_frame * (image_repeat if kind == IMAGE else frames) * tiles


def visual_order(kinds) -> torch.Tensor:
    """`visual_order` for placeholders (`<image>` / `<video>`) or kinds in text order."""
    return torch.tensor([PLACEHOLDER_KINDS.get(kind, kind) for kind in kinds])


def items_per_sample(items: list, placeholders: list[int], tokens: list[int]) -> list[list]:
    """`items` (in text order, filling `tokens` each) dealt to the samples of a batch by their `placeholders`
    (context tokens per sample): each sample takes whole items until its count is filled. A count that does not
    end on an item's boundary, or items left over, is an error: features would go to the wrong sample."""
    groups, position = [], 0
    for sample, wanted in enumerate(placeholders):
        start, filled = position, 0
        while filled < wanted and position < len(items):
            filled += tokens[position]
            position += 1
        if filled != wanted:
            raise ValueError(
                f"Sample {sample} holds {wanted} image tokens, but the images and videos that come next in text "
                f"order (visual_order) fill {filled}: {tokens[start:position]}. Each sample's <image>/<video> "
                "placeholders must be expanded for its own items, in order, as PVCProcessor does."
            )
        groups.append(items[start:position])
    if position != len(items):
        raise ValueError(
            f"The batch's text holds {sum(placeholders)} image tokens, which its first {position} images and videos "
            f"fill; {len(items) - position} more were given."
        )
    return groups


def as_grids(inputs: dict) -> dict:
    """`inputs` with the per-item counts as grid rows: `image_num_tiles` -> `image_grid_thw` (1, 1, tiles),
    `video_num_frames` + `video_num_tiles` -> `video_grid_thw` (frames, 1, tiles). `visual_layout` reads either."""
    inputs = dict(inputs)
    if "image_num_tiles" in inputs:
        tiles = inputs.pop("image_num_tiles")
        inputs["image_grid_thw"] = torch.stack([torch.ones_like(tiles), torch.ones_like(tiles), tiles], dim=1)
    if "video_num_frames" in inputs:
        frames, tiles = inputs.pop("video_num_frames"), inputs.pop("video_num_tiles")
        inputs["video_grid_thw"] = torch.stack([frames, torch.ones_like(frames), tiles], dim=1)
    return inputs


@dataclass(frozen=True)
class VisualLayout:
    """How a batch's pixel rows divide into images and videos, and their order in its text: what `visual_layout` reads
    from the count inputs, once, as plain ints. The model's shapes and splits follow from it without reading a tensor
    again, so a compiled vision path has no graph break; torch.compile specialises on these numbers, so each distinct
    layout is a graph of its own (past torch._dynamo.config.recompile_limit, 8 by default, the rest run eagerly: with
    tiling that varies per batch, compile the tower and projector, which see only pixel shapes)."""

    image_tiles: tuple[int, ...] = ()  # tiles of each image
    video_frames: tuple[int, ...] = ()  # frames of each video
    video_tiles: tuple[int, ...] = ()  # tiles per frame of each video
    order: tuple[int, ...] = ()  # IMAGE or VIDEO for each item, in text order

    @property
    def video_rows(self) -> tuple[int, ...]:
        """The pixel rows of each video: frames x tiles per frame."""
        return tuple(frames * tiles for frames, tiles in zip(self.video_frames, self.video_tiles))

    def in_text_order(self, images: list, videos: list) -> list:
        """Per-image and per-video items (one list per kind, in their own order) interleaved in text order."""
        images, videos = iter(images), iter(videos)
        return [next(videos) if kind == VIDEO else next(images) for kind in self.order]


def visual_layout(
    pixel_values=None,
    pixel_values_videos=None,
    *,
    image_num_tiles=None,
    video_num_frames=None,
    video_num_tiles=None,
    visual_order=None,
    image_grid_thw=None,
    video_grid_thw=None,
) -> VisualLayout:
    """The batch's `VisualLayout`, from its count inputs in either layout (a grid, where given, over the counts),
    checked against the pixel rows: tiles per image (one each without counts), frames of each video and its tiles per
    frame (one without counts), and the text order (`visual_order`, which a batch of both kinds cannot do without).
    The pixels' rows are all that is read of them."""
    if image_grid_thw is not None:
        image_num_tiles = image_grid_thw.prod(-1)
    if video_grid_thw is not None:
        video_num_frames, video_num_tiles = video_grid_thw[:, 0], video_grid_thw[:, 1:].prod(-1)
    image_tiles = video_frames = video_tiles = ()
    if pixel_values is not None:
        rows = pixel_values.shape[0]
        image_tiles = (1,) * rows if image_num_tiles is None else _ints(image_num_tiles)
        _check_rows(image_tiles, rows, "image_num_tiles", "pixel_values")
    if pixel_values_videos is not None:
        if video_num_frames is None:
            raise ValueError(
                "pixel_values_videos needs video_num_frames (or video_grid_thw): the number of frames of each video."
            )
        video_frames = _ints(video_num_frames)
        video_tiles = (1,) * len(video_frames) if video_num_tiles is None else _ints(video_num_tiles)
        if len(video_tiles) != len(video_frames):
            raise ValueError(
                f"video_num_frames counts {len(video_frames)} videos ({list(video_frames)}), video_num_tiles "
                f"{len(video_tiles)} ({list(video_tiles)}): give one count of each per video."
            )
        rows = tuple(frames * tiles for frames, tiles in zip(video_frames, video_tiles))
        _check_rows(rows, pixel_values_videos.shape[0], "video_num_frames (x video_num_tiles)", "pixel_values_videos")
    order = _text_order(visual_order, len(image_tiles), len(video_frames))
    return VisualLayout(image_tiles, video_frames, video_tiles, order)


def _ints(counts) -> tuple[int, ...]:
    """Counts (a tensor, an array, a list) as Python ints; a tensor is read in one go (one device sync)."""
    counts = counts.reshape(-1).tolist() if isinstance(counts, torch.Tensor) else counts  # a 0-d tensor: one item
    return tuple(int(count) for count in counts)


def _check_rows(counts: tuple[int, ...], total: int, counts_name: str, tensor_name: str):
    if sum(counts) != total or any(count < 1 for count in counts):
        raise ValueError(
            f"{counts_name} {list(counts)} must be positive and add up to the {total} rows of {tensor_name}."
        )


def _text_order(order, num_images: int, num_videos: int) -> tuple[int, ...]:
    """`visual_order` as ints, checked against the items; a batch of one kind needs none, a batch of both cannot do
    without. Without pixels it is left unread: decoding steps after the prefill keep the order and counts, not the
    pixels."""
    if order is None or not num_images + num_videos:
        if num_images and num_videos:
            raise ValueError(
                "This batch holds both images and videos, whose placeholders share the <IMG_CONTEXT> token, so "
                "their order in the text is ambiguous. Pass `visual_order` (0 = image, 1 = video, one entry "
                "per visual in text order), as PVCProcessor returns it."
            )
        return (IMAGE,) * num_images + (VIDEO,) * num_videos
    order = _ints(order)
    if sorted(order) != [IMAGE] * num_images + [VIDEO] * num_videos:
        raise ValueError(
            f"visual_order {list(order)} must hold one 0 per image ({num_images} given) and one 1 per video "
            f"({num_videos} given)."
        )
    return order
