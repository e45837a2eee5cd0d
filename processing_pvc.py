"""PVCProcessor: text with `<image>` / `<video>` placeholders, images and videos -> model inputs.

Each `<image>` becomes `<img>` + `<IMG_CONTEXT>` x (tokens_per_frame x image_repeat x tiles) + `</img>`, each
`<video>` becomes one `Frame{i}: <img>` + `<IMG_CONTEXT>` x (tokens_per_frame x tiles) + `</img>` line per frame
(the frame prompt of InternVL2 and PVC), so the text holds exactly as many context tokens as the model makes
features.
"""

import itertools
import re

import torch
from transformers import BatchFeature, ProcessorMixin

from .image_processing_pvc import PVCVideoProcessor, _flatten, _flatten_videos, tile_grid

IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER = "<image>", "<video>"
PLACEHOLDERS = re.compile(r"<image>|<video>")
# Keyword options: for the pixels (see `PVCImageProcessor`), and the tokenizer's own.
PIXEL_OPTIONS = ("max_tiles", "num_frames", "fps", "max_frames", "start", "end", "video_max_tiles")
# Options of the output's layout (see `PVCProcessor.__call__`).
LAYOUT_OPTIONS = ("grid_layout", "return_text_replacement_offsets")
TOKENIZER_OPTIONS = (
    "add_special_tokens",
    "truncation",
    "max_length",
    "stride",
    "pad_to_multiple_of",
    "return_token_type_ids",
    "return_attention_mask",
    "return_overflowing_tokens",
    "return_special_tokens_mask",
    "return_offsets_mapping",
    "return_length",
    "verbose",
)
IMAGE_START, IMAGE_END, IMAGE_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
# InternVL2's default system message, which PVC keeps (the prompt the original chat() builds).
DEFAULT_SYSTEM_MESSAGE = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
)
# How each chat style opens a turn of `role` (a Jinja expression) and closes it.
CHAT_STYLES = {
    "chatml": ("'<|im_start|>' + role + '\\n'", "<|im_end|>"),
    "phi3": ("'<|' + role + '|>\\n'", "<|end|>"),
}


def build_chat_template(style: str = "chatml", system_message: str = DEFAULT_SYSTEM_MESSAGE) -> str:
    """A Jinja chat template in InternVL2's layout: turns follow each other without newlines; image and video
    content items become `<image>\\n` / `<video>\\n` placeholders before the text; a system turn with
    `system_message` comes first unless the conversation starts with its own."""
    if style not in CHAT_STYLES:
        raise ValueError(f"Unknown chat style {style!r}; choose one of {sorted(CHAT_STYLES)}.")
    opening, closing = CHAT_STYLES[style]
    system = system_message.replace("'", "\\'")
    return (
        "{%- macro render(content) -%}"
        "{%- if content is string -%}{{ content }}{%- else -%}{%- for item in content -%}"
        "{%- if item['type'] == 'image' -%}{{ '<image>\\n' }}"
        "{%- elif item['type'] == 'video' -%}{{ '<video>\\n' }}"
        "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{%- endmacro -%}"
        "{%- macro turn(role, content) -%}{{ " + opening + " + content + '" + closing + "' }}{%- endmacro -%}"
        "{%- if messages[0]['role'] == 'system' -%}"
        "{{ turn('system', render(messages[0]['content'])) }}{%- set rest = messages[1:] -%}"
        "{%- else -%}{{ turn('system', '" + system + "') }}{%- set rest = messages -%}{%- endif -%}"
        "{%- for message in rest -%}{{ turn(message['role'], render(message['content'])) }}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{%- set role = 'assistant' -%}{{ " + opening + " }}{%- endif -%}"
    )


class PVCProcessor(ProcessorMixin):
    r"""
    Tokenizer and `PVCImageProcessor` together.

    Args:
        image_processor (`PVCImageProcessor`), tokenizer (any tokenizer holding `<img>`, `</img>`, `<IMG_CONTEXT>`).
        chat_template (`str`, *optional*): Jinja template; `build_chat_template("chatml")` by default.
        tokens_per_frame (`int`, defaults to 64): visual tokens per frame and tile (the model config's
            `tokens_per_frame`).
        image_repeat (`int`, defaults to 4): frames of an image's static clip (the model config's `image_repeat`).
        grid_layout (`bool`, defaults to `False`): the default of `__call__`'s `grid_layout` (vLLM sets it).

    The placeholders are `image_token` (`<image>`) and `video_token` (`<video>`); `video_processor` is the video half
    of the image processor (`PVCVideoProcessor`), configured by the image processor's settings (`num_frames`,
    `video_max_tiles`), so it saves and loads with them.
    """

    image_token, video_token = IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        tokens_per_frame=64,
        image_repeat=4,
        grid_layout=False,
        **kwargs,
    ):
        if chat_template is None:
            chat_template = build_chat_template("chatml")
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.tokens_per_frame = tokens_per_frame
        self.image_repeat = image_repeat
        self.grid_layout = grid_layout

    @property
    def video_processor(self) -> PVCVideoProcessor:
        # A view, not a saved attribute: transformers' own video processors need torchvision (BaseVideoProcessor).
        return PVCVideoProcessor(self.image_processor)

    @property
    def model_input_names(self):
        visual = [*self.image_processor.model_input_names, *self.video_processor.model_input_names]
        return ["input_ids", "attention_mask", *visual, "visual_order"]

    def token_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or (token_id == self.tokenizer.unk_token_id and token != self.tokenizer.unk_token):
            raise ValueError(
                f"The tokenizer has no {token} token. PVC needs InternVL's special tokens {IMAGE_START}, {IMAGE_END} "
                f"and {IMAGE_CONTEXT}: add them with tokenizer.add_special_tokens and resize the model's embeddings."
            )
        return token_id

    def image_prompt(self, num_tiles: int) -> str:
        return IMAGE_START + IMAGE_CONTEXT * (self.tokens_per_frame * self.image_repeat * num_tiles) + IMAGE_END

    def video_prompt(self, num_frames: int, num_tiles: int = 1) -> str:
        frame = IMAGE_START + IMAGE_CONTEXT * (self.tokens_per_frame * num_tiles) + IMAGE_END
        return "\n".join(f"Frame{index + 1}: {frame}" for index in range(num_frames))

    def __call__(
        self, text=None, images=None, videos=None, return_tensors="pt", padding=True, padding_side="left", **kwargs
    ) -> BatchFeature:
        r"""
        Args:
            text (`str` or `list[str]`): prompts with one `<image>` per image and one `<video>` per video, in order.
            images: PIL images, arrays, tensors, paths or http(s) URLs (a flat or per-sample nested list).
            videos: paths or http(s) URLs, lists of frames or arrays [T, H, W, 3] (a list of these).
            padding, padding_side: batches are padded on the left by default, ready for `generate`.
            grid_layout (`bool`, defaults to the processor's, `False`): give each image's and video's counts as
                `image_grid_thw` (1, 1, tiles) and `video_grid_thw` (frames, 1, tiles) rows, one per item, instead
                of `image_num_tiles`, `video_num_frames` and `video_num_tiles` (the layout vLLM splits per item;
                the model takes either).
            return_text_replacement_offsets (`bool`): also return, per sample, where each placeholder was and what
                replaced it (`text_replacement_offsets`, as transformers' processors give it).
            Other keyword arguments: `max_tiles` for images; `num_frames`, `fps`, `max_frames`, `start`, `end`,
            `video_max_tiles` for videos (see `PVCImageProcessor`); the tokenizer's own (`truncation`,
            `max_length`, ...). Any other keyword is an error, and truncation may not cut into visual tokens.

        Returns:
            `BatchFeature` with `input_ids`, `attention_mask`, `pixel_values` + `image_num_tiles`,
            `pixel_values_videos` + `video_num_frames` + `video_num_tiles`, and `visual_order` (0 image, 1 video, in
            text order) when both images and videos are given.
        """
        _check_options(kwargs, "PVCProcessor", extra=LAYOUT_OPTIONS)
        grid_layout = kwargs.pop("grid_layout", self.grid_layout)
        return_offsets = kwargs.pop("return_text_replacement_offsets", False)
        pixel_options = {key: kwargs.pop(key) for key in PIXEL_OPTIONS if key in kwargs}
        images = (_flatten(images) or None) if images is not None else None  # an empty list is no media
        videos = (_flatten_videos(videos) or None) if videos is not None else None
        texts = [] if text is None else [text] if isinstance(text, str) else list(text)
        kinds = [match.group() for sample in texts for match in PLACEHOLDERS.finditer(sample)]
        for placeholder, given, name in ((IMAGE_PLACEHOLDER, images, "images"), (VIDEO_PLACEHOLDER, videos, "videos")):
            expected = kinds.count(placeholder)
            if text is not None and expected != len(given or []):  # checked before any media is decoded
                raise ValueError(
                    f"The text holds {expected} {placeholder} placeholder(s) but {len(given or [])} {name} were "
                    f"given: put one {placeholder} in the text where each of the {name} goes."
                )
        visual = {}
        if images is not None:
            image_options = {key: pixel_options[key] for key in ("max_tiles",) if key in pixel_options}
            visual.update(self.image_processor(images=images, return_tensors="pt", **image_options))
        if videos is not None:
            video_options = {key: value for key, value in pixel_options.items() if key != "max_tiles"}
            visual.update(self.video_processor(videos=videos, return_tensors="pt", **video_options))
        if images and videos and text is not None:
            visual["visual_order"] = torch.tensor([int(kind == VIDEO_PLACEHOLDER) for kind in kinds])
        if text is not None:
            for token in (IMAGE_START, IMAGE_END, IMAGE_CONTEXT):
                self.token_id(token)
            replacements = self.expansions(kinds, visual)
            expanded, offsets = zip(*(_replaced(sample, replacements) for sample in texts)) if texts else ((), ())
            encoding = self.tokenizer(list(expanded), padding=padding, padding_side=padding_side, **kwargs)
            self._check_visual_tokens_kept(expanded, encoding["input_ids"], kwargs.get("max_length"))
            visual = {**encoding, **visual}
            if return_offsets:
                visual["text_replacement_offsets"] = list(offsets)
        if grid_layout:
            visual = _as_grids(visual)
        if return_tensors is None:  # lists, as a tokenizer gives them (pixels: one array per tile or frame)
            visual = {key: _as_list(value) for key, value in visual.items()}
        return BatchFeature(
            data=visual, tensor_type=return_tensors, skip_tensor_conversion=["text_replacement_offsets"]
        )

    def _get_num_multimodal_tokens(self, image_sizes=None, video_sizes=None, **kwargs) -> dict:
        r"""
        What the given media become, without reading any (transformers' processor convention, which vLLM uses):
        `num_image_tokens` and `num_image_patches` (tiles) per image size (height, width), and `num_video_tokens`
        per video size (frames, height, width). Options as in `__call__` (`max_tiles`, `num_frames`,
        `video_max_tiles`); a video becomes `num_frames` frames whatever its length, as `sample_frames` gives.
        """
        settings = self.image_processor
        size, tokens = settings.image_size, self.tokens_per_frame
        data = {}
        if image_sizes is not None:
            max_tiles = kwargs.get("max_tiles") or settings.max_tiles
            tiles = [
                _num_tiles(width, height, settings.min_tiles, max_tiles, size, settings.use_thumbnail)
                for height, width in image_sizes
            ]
            data["num_image_tokens"] = [tokens * self.image_repeat * count for count in tiles]
            data["num_image_patches"] = tiles
        if video_sizes is not None:
            max_tiles = kwargs.get("video_max_tiles") or settings.video_max_tiles
            frames = kwargs.get("num_frames") or settings.num_frames
            tiling = (settings.min_tiles, max_tiles, size, settings.use_thumbnail)  # as `_tile_frame`
            data["num_video_tokens"] = [
                tokens * frames * (1 if max_tiles == 1 else _num_tiles(width, height, *tiling))
                for _, height, width in video_sizes
            ]
        return data

    def expansions(self, kinds, visual):
        """The text each placeholder (`kinds`, in text order) becomes, through the `replace_*_token` hooks."""
        counters = {IMAGE_PLACEHOLDER: itertools.count(), VIDEO_PLACEHOLDER: itertools.count()}
        for kind in kinds:
            index = next(counters[kind])
            if kind == IMAGE_PLACEHOLDER:
                yield self.replace_image_token(visual, index)
            else:
                yield self.replace_video_token(visual, index)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        """The text an image's placeholder becomes (transformers' processor hook): `<img>`, then
        tokens_per_frame x image_repeat x tiles `<IMG_CONTEXT>`, then `</img>`."""
        return self.image_prompt(int(image_inputs["image_num_tiles"][image_idx]))

    def replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs) -> str:
        """The text a video's placeholder becomes (transformers' processor hook): one `Frame{i}: <img>...</img>`
        line per frame, tokens_per_frame x tiles `<IMG_CONTEXT>` each."""
        frames = int(video_inputs["video_num_frames"][video_idx])
        return self.video_prompt(frames, int(video_inputs["video_num_tiles"][video_idx]))

    def _check_visual_tokens_kept(self, expanded: list[str], input_ids, max_length):
        """Truncation must not cut into the visual tokens: the model would get fewer places than features."""
        context = self.token_id(IMAGE_CONTEXT)
        for index, (sample, ids) in enumerate(zip(expanded, input_ids)):
            wanted = sample.count(IMAGE_CONTEXT)
            kept = sum(1 for token in ids if int(token) == context)
            if kept != wanted:
                raise ValueError(
                    f"Truncation to max_length={max_length} cuts into the visual tokens of sample {index}: {kept} of "
                    f"its {wanted} {IMAGE_CONTEXT} tokens would be kept. Raise max_length, or give fewer tiles "
                    "(max_tiles) or frames (num_frames), or leave truncation off."
                )

    def apply_chat_template(
        self,
        conversation,
        chat_template=None,
        add_generation_prompt=False,
        tokenize=False,
        return_dict=False,
        return_tensors=None,
        processor_kwargs=None,
        continue_final_message=False,
        tools=None,
        documents=None,
        **kwargs,
    ):
        r"""
        Render one conversation (a list of messages) or a batch of them. Content items: `{"type": "text", "text":
        ...}`, `{"type": "image", "image" | "path" | "url": ...}`, `{"type": "video", "video" | "path" | "url": ...}`
        and OpenAI's `{"type": "image_url" | "video_url", "image_url" | "video_url": {"url": ...}}` (http(s) or
        `data:` URLs). With `tokenize=True` the media are loaded and the result is this processor's output (a
        `BatchFeature` when `return_dict=True`, else the `input_ids`); otherwise the prompt text(s). Options for the
        processor (`num_frames`, `max_tiles`, `max_length`, ...) may come as keywords or, as transformers passes
        them, in `processor_kwargs`; an option this processor does not know is an error.
        """
        options = dict(processor_kwargs or {})
        clashing = sorted(key for key in set(options) & set(kwargs) if options[key] != kwargs[key])
        if clashing:
            raise ValueError(f"{clashing} given both as keywords and in processor_kwargs, with different values.")
        options.update(kwargs)
        _check_options(options, "apply_chat_template", extra=("padding", "padding_side"))
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        conversations = [
            [dict(message, content=_normalized_content(message["content"])) for message in messages]
            for messages in (conversation if batched else [conversation])
        ]
        template = chat_template if chat_template is not None else self.chat_template
        texts = [
            self.tokenizer.apply_chat_template(
                messages,
                chat_template=template,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tools=tools,
                documents=documents,
                tokenize=False,
            )
            for messages in conversations
        ]
        if not tokenize:
            return texts if batched else texts[0]
        images, videos = [], []
        for messages in conversations:
            for message in messages:
                content = message["content"]
                for item in [] if isinstance(content, str) else content:
                    if item["type"] == "image":
                        images.append(_media(item, ("image", "path", "url")))
                    elif item["type"] == "video":
                        videos.append(_media(item, ("video", "path", "url")))
        outputs = self(
            text=texts, images=images or None, videos=videos or None, return_tensors=return_tensors, **options
        )
        return outputs if return_dict else outputs["input_ids"]


def _replaced(text: str, replacements) -> tuple[str, list[dict]]:
    """`text` with each placeholder replaced by the next of `replacements`, and where each one was and went (the
    entries of transformers' `text_replacement_offsets`)."""
    pieces, offsets, end, new_end = [], [], 0, 0
    for match in PLACEHOLDERS.finditer(text):
        replacement = next(replacements)
        new_start = new_end + match.start() - end
        pieces += [text[end : match.start()], replacement]
        new_end = new_start + len(replacement)
        offsets.append(
            {
                "type": "image" if match.group() == IMAGE_PLACEHOLDER else "video",
                "span": (match.start(), match.end()),
                "new_span": (new_start, new_end),
                "text": match.group(),
                "replacement": replacement,
            }
        )
        end = match.end()
    return "".join(pieces) + text[end:], offsets


def _as_grids(visual: dict) -> dict:
    """The per-item counts as one (t, h, w) row per image, (1, 1, tiles), and per video, (frames, 1, tiles)."""
    visual = dict(visual)
    if "pixel_values" in visual:
        tiles = visual.pop("image_num_tiles")
        visual["image_grid_thw"] = torch.stack([torch.ones_like(tiles), torch.ones_like(tiles), tiles], dim=1)
    if "pixel_values_videos" in visual:
        frames, tiles = visual.pop("video_num_frames"), visual.pop("video_num_tiles")
        visual["video_grid_thw"] = torch.stack([frames, torch.ones_like(frames), tiles], dim=1)
    return visual


def _num_tiles(width, height, min_tiles, max_tiles, size, use_thumbnail) -> int:
    columns, rows = tile_grid(width, height, min_tiles, max_tiles, size)
    return columns * rows + int(use_thumbnail and columns * rows > 1)


def _check_options(options: dict, where: str, extra=()):
    unknown = sorted(set(options) - set(PIXEL_OPTIONS) - set(TOKENIZER_OPTIONS) - set(extra))
    if unknown:
        raise TypeError(
            f"{where} got unknown option(s) {unknown}. Pixel options: {', '.join(PIXEL_OPTIONS)}; tokenizer options: "
            f"{', '.join(TOKENIZER_OPTIONS)}, padding, padding_side."
        )


def _normalized_content(content):
    """Content items as the chat template renders them: OpenAI's image_url / video_url become image / video items;
    an item of any other unknown type is an error (it would silently vanish from the prompt)."""
    if isinstance(content, str):
        return content
    items = []
    for item in content:
        kind = item.get("type")
        if kind in ("image_url", "video_url"):
            value = item.get(kind)
            url = value.get("url") if isinstance(value, dict) else value
            if not isinstance(url, str):
                raise ValueError(f"A {kind} content item needs {{'{kind}': {{'url': ...}}}}; got {item}.")
            item = {"type": kind.removesuffix("_url"), "url": url}
        elif kind not in ("text", "image", "video"):
            raise ValueError(
                f"Content items of type {kind!r} are not supported; use text, image, video, image_url or video_url."
            )
        items.append(item)
    return items


def _as_list(value):
    if isinstance(value, torch.Tensor):
        return list(value.numpy()) if value.ndim == 4 else value.tolist()
    return value


def _media(item: dict, keys) -> object:
    for key in keys:
        if item.get(key) is not None:
            return item[key]
    raise ValueError(f"A {item.get('type')} content item needs one of the keys {list(keys)}; got {sorted(item)}.")


# Saving writes the code files and the `auto_map` beside the weights, however this file was imported.
PVCProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["PVCProcessor", "build_chat_template"]
