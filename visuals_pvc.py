"""What the processor, the model and training agree on about visual inputs, in one place.

- The kinds: an image (`IMAGE`, placeholder `<image>`) is a static clip of `image_repeat` frames of its tiles; a
  video (`VIDEO`, `<video>`) is its frames, each of `tiles` tiles (1 by default).
- The token counts: `tokens_per_frame` `<IMG_CONTEXT>` tokens per frame and tile (`visual_tokens`).
- The per-item count layouts, both ways: `image_num_tiles` / `video_num_frames` / `video_num_tiles` (one entry per
  item) or the grid layout vLLM splits per item, one (t, h, w) row per item: `image_grid_thw` = (1, 1, tiles),
  `video_grid_thw` = (frames, 1, tiles) (`as_grids`, `counts_from_grids`).
- The text order of visuals in a batch holding both kinds: `visual_order`, 0 per image and 1 per video as their
  placeholders come (`visual_order`, `in_text_order`), and which items belong to which sample (`items_per_sample`).

How many tiles an image gets is the image processor's (`PVCImageProcessor.num_tiles`, beside its tiling).
"""

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


def in_text_order(images: list, videos: list, order=None) -> list:
    """Per-image and per-video items interleaved as `visual_order` says (0 image, 1 video, in text order); a batch
    of one kind needs no order, a batch of both cannot do without."""
    if order is None:
        if images and videos:
            raise ValueError(
                "This batch holds both images and videos, whose placeholders share the <IMG_CONTEXT> token, so "
                "their order in the text is ambiguous. Pass `visual_order` (0 = image, 1 = video, one entry "
                "per visual in text order), as PVCProcessor returns it."
            )
        return images + videos
    order = [int(kind) for kind in order]
    if sorted(order) != [IMAGE] * len(images) + [VIDEO] * len(videos):
        raise ValueError(
            f"visual_order {order} must hold one 0 per image ({len(images)} given) and one 1 per video "
            f"({len(videos)} given)."
        )
    images, videos = iter(images), iter(videos)
    return [next(videos) if kind == VIDEO else next(images) for kind in order]


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
    `video_num_frames` + `video_num_tiles` -> `video_grid_thw` (frames, 1, tiles). `counts_from_grids` undoes it."""
    inputs = dict(inputs)
    if "image_num_tiles" in inputs:
        tiles = inputs.pop("image_num_tiles")
        inputs["image_grid_thw"] = torch.stack([torch.ones_like(tiles), torch.ones_like(tiles), tiles], dim=1)
    if "video_num_frames" in inputs:
        frames, tiles = inputs.pop("video_num_frames"), inputs.pop("video_num_tiles")
        inputs["video_grid_thw"] = torch.stack([frames, torch.ones_like(frames), tiles], dim=1)
    return inputs


def counts_from_grids(inputs: dict | None = None, **grids) -> dict:
    """`image_num_tiles`, `video_num_frames` and `video_num_tiles` from the grid rows `as_grids` writes; the grids
    are popped from `inputs` when given, else read from the keywords."""
    grids = {name: (inputs.pop(name, None) if inputs is not None else grids.get(name)) for name in GRID_INPUTS}
    counts = {}
    if grids["image_grid_thw"] is not None:
        counts["image_num_tiles"] = grids["image_grid_thw"].prod(-1)
    if grids["video_grid_thw"] is not None:
        counts["video_num_frames"] = grids["video_grid_thw"][:, 0]
        counts["video_num_tiles"] = grids["video_grid_thw"][:, 1:].prod(-1)
    return counts
