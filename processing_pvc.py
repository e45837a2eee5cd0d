"""PVCProcessor: text with `<image>` / `<video>` placeholders, images and videos -> model inputs.

Each `<image>` becomes `<img>` + `<IMG_CONTEXT>` x (tokens_per_frame x image_repeat x tiles) + `</img>`, each
`<video>` becomes one `Frame{i}: <img>` + `<IMG_CONTEXT>` x (tokens_per_frame x tiles) + `</img>` line per frame
(the frame prompt of InternVL2 and PVC), so the text holds exactly as many context tokens as the model makes
features.
"""

import dataclasses
import difflib
import itertools
import logging
import os
import re
from collections.abc import Mapping
from typing import Unpack

import torch
from transformers import BatchFeature, ProcessorMixin
from transformers.image_utils import ImageInput
from transformers.processing_utils import ImagesKwargs, ProcessingKwargs
from transformers.utils.chat_template_utils import render_jinja_template
from transformers.video_processing_utils import BaseVideoProcessor
from transformers.video_utils import VideoInput

from .image_processing_pvc import (
    STANDARD_OPTIONS,
    TILING_REPLACES,
    _flatten,
    _flatten_videos,
    _is_frame,
    resolve_backend,
)

# transformers 5.0 copies a local checkpoint's remote-code file with only the files it imports itself (later 5.x
# follow the imports of those too): what image_processing_pvc.py imports must be imported here as well.
from .video_decoding_pvc import check_sampling  # noqa: F401
from .video_processing_pvc import SETTINGS as VIDEO_SETTINGS
from .video_processing_pvc import PVCVideoProcessor, PVCVideoProcessorKwargs
from .visuals_pvc import IMAGE, VIDEO, as_grids, visual_order, visual_tokens

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER = "<image>", "<video>"
PLACEHOLDERS = re.compile(r"<image>|<video>")


class PVCImagesKwargs(ImagesKwargs, total=False):
    """transformers' image options (those PVC honours, see `PVCImageProcessor`) and the tile limit."""

    max_tiles: int


class PVCProcessorKwargs(ProcessingKwargs, total=False):
    """What `PVCProcessor.__call__` takes, per sub-processor (transformers' typed processor kwargs): flat, or in
    `text_kwargs` / `images_kwargs` / `videos_kwargs` / `common_kwargs`."""

    images_kwargs: PVCImagesKwargs
    videos_kwargs: PVCVideoProcessorKwargs
    _defaults = {"text_kwargs": {"padding": True, "padding_side": "left"}}


MODALITIES = ("text_kwargs", "images_kwargs", "videos_kwargs", "audio_kwargs")
# What PVCImageProcessor's call takes, or refuses with a reason (see there).
IMAGE_CALL_OPTIONS = {"max_tiles", "size", *STANDARD_OPTIONS, *TILING_REPLACES}
# Options of the output itself (see `PVCProcessor.__call__`), taken before the sub-processors' are routed.
OUTPUT_OPTIONS = ("grid_layout", "return_text_replacement_offsets", "return_mm_token_type_ids")
# Tokenizer options that do not fit prompts holding placeholders (one text per sample, expanded here).
REFUSED_TEXT_OPTIONS = ("text_pair", "text_target", "text_pair_target", "is_split_into_words")
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
    `system_message` comes first unless the conversation starts with its own. What the assistant says, its turn's
    end included, is marked `{% generation %}` (for `return_assistant_tokens_mask`; the text is the same)."""
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
        "{%- for message in rest -%}{%- if message['role'] == 'assistant' -%}{%- set role = 'assistant' -%}"
        "{{ " + opening + " }}{% generation %}{{ render(message['content']) + '" + closing + "' }}{% endgeneration %}"
        "{%- else -%}{{ turn(message['role'], render(message['content'])) }}{%- endif -%}{%- endfor -%}"
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

    The placeholders are `image_token` (`<image>`) and `video_token` (`<video>`). Videos go through `video_processor`
    (`PVCVideoProcessor`, a transformers video processor), saved inside `processor_config.json` and as
    `video_preprocessor_config.json`; without one (a checkpoint saved before it existed, or a processor built from an
    image processor alone) it takes the image processor's settings (`num_frames`, `video_max_tiles`, tile side,
    normalisation). Pass `video_processor=` to the constructor or to `from_pretrained` to give another.
    """

    image_token, video_token = IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
    valid_processor_kwargs = PVCProcessorKwargs

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
        video_processor = kwargs.pop("video_processor", None)
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.tokens_per_frame = tokens_per_frame
        self.image_repeat = image_repeat
        self.grid_layout = grid_layout
        self.video_processor = video_processor

    # The video processor is kept out of transformers' list of sub-processors (`get_attributes`), which would make
    # loading fail on checkpoints saved without one; it is saved and loaded here instead.
    @property
    def video_processor(self) -> PVCVideoProcessor:
        return self._video_processor

    @video_processor.setter
    def video_processor(self, video_processor: PVCVideoProcessor | None):
        if video_processor is None:
            video_processor = PVCVideoProcessor.from_image_processor(self.image_processor)
        elif not isinstance(video_processor, BaseVideoProcessor):
            raise TypeError(f"video_processor must be a PVCVideoProcessor; got {type(video_processor).__name__}.")
        self._video_processor = video_processor

    def to_dict(self) -> dict:
        output = super().to_dict()
        output.pop("_video_processor", None)
        output["video_processor"] = self.video_processor.to_dict()
        return output

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """As transformers' `save_pretrained`; the video processor goes into `processor_config.json` and, for
        `AutoVideoProcessor` on any transformers 5.x, into `video_preprocessor_config.json` (written first, so that
        `push_to_hub` uploads it too)."""
        os.makedirs(save_directory, exist_ok=True)
        self.video_processor.save_pretrained(save_directory)
        return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, video_processor=None, **kwargs):
        """As transformers' `from_pretrained`; the video processor is the one saved with the checkpoint, else the
        image processor's settings (see the class). Video settings given here (`num_frames`, `fps`, `max_frames`,
        `video_max_tiles`, ...) set the video processor's, tiling and pixel ones both processors'; `backend` /
        `use_fast` choose both processors' pixel backend."""
        choice = {key: kwargs.pop(key) for key in ("backend", "use_fast") if key in kwargs}  # a tokenizer has one too
        video_only = {key: kwargs.pop(key) for key in ("fps", "max_frames", "do_sample_frames") if key in kwargs}
        processor = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if choice:
            processor.image_processor.backend = resolve_backend(choice.get("backend"), choice.get("use_fast"))
        overrides = {**{key: kwargs[key] for key in VIDEO_SETTINGS if key in kwargs}, **video_only}
        if video_processor is None:
            video_processor = _saved_video_processor(
                pretrained_model_name_or_path, processor.image_processor, kwargs, overrides
            )
        processor.video_processor = video_processor
        return processor

    @classmethod
    def validate_init_kwargs(cls, processor_config, valid_kwargs):
        # the saved video processor (see `from_pretrained`) is no argument of `__init__`
        processor_config = {key: value for key, value in processor_config.items() if key != "video_processor"}
        return super().validate_init_kwargs(processor_config, valid_kwargs)

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
        tokens = visual_tokens(self.tokens_per_frame, self.image_repeat, IMAGE, num_tiles)
        return IMAGE_START + IMAGE_CONTEXT * tokens + IMAGE_END

    def video_prompt(self, num_frames: int, num_tiles: int = 1) -> str:
        tokens = visual_tokens(self.tokens_per_frame, self.image_repeat, VIDEO, num_tiles)  # one frame's
        frame = IMAGE_START + IMAGE_CONTEXT * tokens + IMAGE_END
        return "\n".join(f"Frame{index + 1}: {frame}" for index in range(num_frames))

    def __call__(
        self,
        text: str | list[str] | None = None,
        images: ImageInput | None = None,
        videos: VideoInput | None = None,
        **kwargs: Unpack[PVCProcessorKwargs],
    ) -> BatchFeature:
        r"""
        Args:
            text (`str` or `list[str]`): prompts with one `<image>` per image and one `<video>` per video, in order.
            images: PIL images, arrays, tensors, paths or http(s) URLs (a flat or per-sample nested list).
            videos: paths or http(s) URLs, lists of frames or arrays [T, H, W, 3] (a list of these).
            audio / audios: PVC takes none; `None` or empty only (what tools that serve every model pass).
            Options, flat or per sub-processor (`text_kwargs`, `images_kwargs`, `videos_kwargs`, `common_kwargs`,
            transformers' typed processor kwargs, routed by `PVCProcessorKwargs`):
            - the tokenizer's (`padding`, on and `"left"` by default, ready for `generate`; `truncation`,
              `max_length`, ...); truncation may not cut into visual tokens;
            - `max_tiles` for images; `num_frames`, `fps`, `max_frames`, `start`, `end`, `video_max_tiles`,
              `do_sample_frames` for videos; the standard pixel options `do_convert_rgb`, `input_data_format`,
              `do_rescale`, `rescale_factor`, `do_normalize`, `image_mean`, `image_std`, `device` (see
              `PVCImageProcessor`); `return_tensors` ("pt" by default; `None` gives lists);
            - `grid_layout` (`bool`, defaults to the processor's, `False`): each image's and video's counts as
              `image_grid_thw` (1, 1, tiles) and `video_grid_thw` (frames, 1, tiles) rows, one per item, instead of
              `image_num_tiles`, `video_num_frames` and `video_num_tiles` (the layout vLLM splits per item; the model
              takes either);
            - `return_text_replacement_offsets` (`bool`): also return, per sample, where each placeholder was and
              what replaced it (`text_replacement_offsets`, as transformers' processors give it);
            - `return_mm_token_type_ids` (`bool`): also return `mm_token_type_ids`: 1 at an image's visual tokens, 2 at
              a video's, else 0 (transformers' convention).
            Any other option is an error, naming the options there are.

        Returns:
            `BatchFeature` with `input_ids`, `attention_mask`, `pixel_values` + `image_num_tiles`,
            `pixel_values_videos` + `video_num_frames` + `video_num_tiles`, and `visual_order` (0 image, 1 video, in
            text order) when both images and videos are given.
        """
        _refuse_audio(kwargs.pop("audio", None), kwargs.pop("audios", None))
        output_options, options = self._routed_options(kwargs)
        return_tensors = options["text_kwargs"].pop("return_tensors", "pt")
        grid_layout = output_options.get("grid_layout", self.grid_layout)
        texts = [] if text is None else [text] if isinstance(text, str) else list(text)
        as_passed = {"images": images, "videos": videos}  # flat, or nested per sample
        images = (_flatten(images) or None) if images is not None else None  # an empty list is no media
        videos = (_flatten_videos(videos) or None) if videos is not None else None
        kinds = [match.group() for sample in texts for match in PLACEHOLDERS.finditer(sample)]
        for placeholder, given, name in ((IMAGE_PLACEHOLDER, images, "images"), (VIDEO_PLACEHOLDER, videos, "videos")):
            expected = kinds.count(placeholder)
            if text is not None and expected != len(given or []):  # checked before any media is decoded
                raise ValueError(
                    f"The number of {placeholder} tokens in the prompts should be the same as the number of {name}: "
                    f"the text holds {expected} {placeholder} placeholder(s) but {len(given or [])} {name} were "
                    f"given. Put one {placeholder} in the text where each of the {name} goes."
                )
        if text is not None:  # media given per sample must match each sample's own placeholders
            for name, placeholder, nested in (
                ("images", IMAGE_PLACEHOLDER, _nested_images),
                ("videos", VIDEO_PLACEHOLDER, _nested_videos),
            ):
                _check_per_sample(texts, as_passed[name], placeholder, name, nested(as_passed[name]))
        visual = {}
        if images is not None:
            visual.update(self.image_processor(images=images, **options["images_kwargs"], return_tensors="pt"))
        if videos is not None:
            visual.update(self.video_processor(videos=videos, **options["videos_kwargs"], return_tensors="pt"))
        if images and videos and text is not None:
            visual["visual_order"] = visual_order(kinds)
        if text is not None:
            for token in (IMAGE_START, IMAGE_END, IMAGE_CONTEXT):
                self.token_id(token)
            replacements = self.expansions(kinds, visual)
            expanded, offsets = zip(*(_replaced(sample, replacements) for sample in texts)) if texts else ((), ())
            text_options = options["text_kwargs"]
            encoding = self.tokenizer(list(expanded), **text_options)
            self._check_visual_tokens_kept(expanded, encoding["input_ids"], text_options.get("max_length"))
            visual = {**encoding, **visual}
            if output_options.get("return_mm_token_type_ids"):
                visual["mm_token_type_ids"] = self._mm_token_type_ids(encoding["input_ids"], offsets)
            if output_options.get("return_text_replacement_offsets"):
                visual["text_replacement_offsets"] = list(offsets)
        if grid_layout:
            visual = as_grids(visual)
        if return_tensors is None:  # lists, as a tokenizer gives them (pixels: one array per tile or frame)
            visual = {key: _as_list(value) for key, value in visual.items()}
        return BatchFeature(
            data=visual, tensor_type=return_tensors, skip_tensor_conversion=["text_replacement_offsets"]
        )

    def _mm_token_type_ids(self, input_ids, offsets) -> list[list[int]]:
        """Per sample, 1 at each `<IMG_CONTEXT>` of an image, 2 at each of a video, else 0: the context tokens come in
        text order, as many per item as its replacement holds."""
        context, types = self.token_id(IMAGE_CONTEXT), []
        for ids, replacements in zip(input_ids, offsets):
            kinds = [
                1 if item["type"] == "image" else 2
                for item in replacements
                for _ in range(item["replacement"].count(IMAGE_CONTEXT))
            ]
            kinds = iter(kinds)
            types.append([next(kinds) if int(token) == context else 0 for token in ids])
        return types

    def _routed_options(self, kwargs: dict) -> tuple[dict, dict]:
        """The output options (`OUTPUT_OPTIONS`), and every other option routed to its sub-processor by
        transformers' kwargs merging (`_merge_kwargs` with `PVCProcessorKwargs`). An option no sub-processor takes
        is an error here, where transformers would warn and drop it."""
        kwargs = dict(kwargs)
        for modality in (*MODALITIES, "common_kwargs"):
            if not isinstance(kwargs.get(modality) or {}, dict):
                raise TypeError(f"{modality} must be a dict of options; got {type(kwargs[modality]).__name__}.")
        output = {key: kwargs.pop(key) for key in OUTPUT_OPTIONS if key in kwargs}
        for modality in ("text_kwargs", "common_kwargs"):  # where transformers' own processors also take them
            if modality in kwargs:
                kwargs[modality] = nested = dict(kwargs[modality] or {})
                for key in OUTPUT_OPTIONS:
                    if key in nested:
                        output.setdefault(key, nested.pop(key))
        valid = VALID_OPTIONS
        everything = set().union(*valid.values())
        problems = sorted(set(kwargs) - everything - set(MODALITIES) - {"common_kwargs"})
        for modality in (*MODALITIES, "common_kwargs"):
            given = kwargs.get(modality) or {}
            allowed = everything if modality == "common_kwargs" else valid[modality]
            problems += [f"{modality}[{key!r}]" for key in sorted(set(given) - allowed)]
        if problems:
            raise TypeError(
                f"PVCProcessor got unknown option(s) {problems}. Text options (the tokenizer's): "
                f"{', '.join(sorted(valid['text_kwargs']))}; image options: {', '.join(sorted(valid['images_kwargs']))}; "
                f"video options: {', '.join(sorted(valid['videos_kwargs']))}; and {', '.join(OUTPUT_OPTIONS)}."
            )
        # The tokenizer's own settings (max_length, padding, ...) are defaults, as in transformers, but for the side it
        # pads on: generation needs the left (PVCProcessorKwargs' default) unless a call asks otherwise.
        tokenizer_defaults = {k: v for k, v in self.tokenizer.init_kwargs.items() if k != "padding_side"}
        routed = self._merge_kwargs(PVCProcessorKwargs, tokenizer_init_kwargs=tokenizer_defaults, **kwargs)
        for modality in ("images_kwargs", "videos_kwargs"):
            routed[modality].pop("return_tensors", None)  # pixels go through one BatchFeature with the text
        for key in OUTPUT_OPTIONS:  # transformers >= 5.24 mirrors some into the text options
            routed["text_kwargs"].pop(key, None)
        # The image processor's saved settings include the video ones of older checkpoints (num_frames, ...), so
        # transformers routes those to images too: each sub-processor keeps what its call takes.
        routed["images_kwargs"] = {k: v for k, v in routed["images_kwargs"].items() if k in IMAGE_CALL_OPTIONS}
        return output, routed

    def _get_num_multimodal_tokens(self, image_sizes=None, video_sizes=None, **kwargs) -> dict:
        r"""
        What the given media become, without reading any (transformers' processor convention, which vLLM uses):
        `num_image_tokens` and `num_image_patches` (tiles) per image size (height, width), and `num_video_tokens`
        per video size (frames, height, width). Options as in `__call__`, flat or per sub-processor (`max_tiles`,
        `size`, `num_frames`, `video_max_tiles`, `do_sample_frames`); a video becomes `num_frames` frames whatever its length, as
        `sample_frames` gives, or keeps its own frames with `do_sample_frames=False`.
        """
        pixels, data = self.image_processor, {}
        _, options = self._routed_options(kwargs)  # flat or per sub-processor, as `__call__` takes them
        images, videos = options["images_kwargs"], options["videos_kwargs"]
        counted = dict(tokens_per_frame=self.tokens_per_frame, image_repeat=self.image_repeat)
        if image_sizes is not None:
            max_tiles = pixels.tile_limit(images.get("max_tiles"), images.get("size"))
            tiles = [pixels.num_tiles(width, height, max_tiles) for height, width in image_sizes]
            data["num_image_tokens"] = [visual_tokens(**counted, kind=IMAGE, tiles=count) for count in tiles]
            data["num_image_patches"] = tiles
        if video_sizes is not None:
            video_processor = self.video_processor
            video_options = video_processor.call_options(**videos)  # as the video processor's call reads them
            frame_pixels = video_processor.pixels(**video_options)
            max_tiles = video_options["video_max_tiles"]
            data["num_video_tokens"] = [
                visual_tokens(
                    **counted,
                    kind=VIDEO,
                    tiles=frame_pixels.num_frame_tiles(width, height, max_tiles),
                    frames=video_processor.frames_kept(frames, **video_options),
                )
                for frames, height, width in video_sizes
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
        return_assistant_tokens_mask=False,
        **kwargs,
    ):
        r"""
        Render one conversation (a list of messages: dicts, or objects with `role` and `content`) or a batch of
        them. Content items: `{"type": "text", "text": ...}`, `{"type": "image", "image" | "path" | "url": ...}`,
        `{"type": "video", "video" | "path" | "url": ...}` and OpenAI's `{"type": "image_url" | "video_url",
        "image_url" | "video_url": {"url": ...}}` (http(s) or `data:` URLs). With `tokenize=True` the media are
        loaded and the result is this processor's output (a `BatchFeature` when `return_dict=True`, else the
        `input_ids`); otherwise the prompt text(s).

        Options for the processor (`num_frames`, `max_tiles`, `max_length`, `images_kwargs`, ...; see `__call__`)
        come in `processor_kwargs` or as keywords; any other keyword is a variable of the chat template (e.g.
        `add_system_prompt=False` for a template that reads one), as in transformers. With
        `return_assistant_tokens_mask=True` (and `return_dict=True`) the output also holds `assistant_masks`: 1 at
        every token of what the assistant says (the template's `{% generation %}` blocks), else 0, as TRL's
        assistant-only loss reads it.
        """
        options = dict(processor_kwargs or {})
        names = OPTION_NAMES
        template = chat_template if chat_template is not None else self.chat_template
        template_variables = {key: value for key, value in kwargs.items() if key not in names}
        _check_template_variables(template_variables, template, names)
        keywords = {key: value for key, value in kwargs.items() if key in names}
        clashing = sorted(key for key in set(options) & set(keywords) if options[key] != keywords[key])
        if clashing:
            raise ValueError(f"{clashing} given both as keywords and in processor_kwargs, with different values.")
        options.update(keywords)
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        conversations = [
            [_as_message(message) for message in messages] for messages in (conversation if batched else [conversation])
        ]
        if return_assistant_tokens_mask and not re.search(r"\{%-?\s*generation\s*-?%\}", template):
            raise ValueError(
                "return_assistant_tokens_mask needs a chat template that marks the assistant's turns with "
                "{% generation %} ... {% endgeneration %}; this one does not. build_chat_template() makes one "
                "(processor.chat_template = build_chat_template(...))."
            )
        texts, generation_spans = render_jinja_template(
            conversations=conversations,
            tools=tools,
            documents=documents,
            chat_template=template,
            return_assistant_tokens_mask=return_assistant_tokens_mask,
            continue_final_message=continue_final_message,
            add_generation_prompt=add_generation_prompt,
            **{**self.tokenizer.special_tokens_map, **template_variables},
        )
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
        if not return_assistant_tokens_mask:
            outputs = self(
                text=texts, images=images or None, videos=videos or None, return_tensors=return_tensors, **options
            )
            return outputs if return_dict else outputs["input_ids"]
        # where each token came from (offsets), and where each placeholder went, to find the assistant's tokens
        asked = {key: options.get(key) for key in ("return_offsets_mapping", "return_text_replacement_offsets")}
        options.update(return_offsets_mapping=True, return_text_replacement_offsets=True)
        outputs = self(text=texts, images=images or None, videos=videos or None, return_tensors=None, **options)
        masks = [
            assistant_mask(offsets, replacements, spans)
            for offsets, replacements, spans in zip(
                outputs["offset_mapping"], outputs["text_replacement_offsets"], generation_spans
            )
        ]
        outputs["assistant_masks"] = masks
        if not asked["return_offsets_mapping"]:
            del outputs["offset_mapping"]
        if not asked["return_text_replacement_offsets"]:
            del outputs["text_replacement_offsets"]
        outputs = BatchFeature(
            dict(outputs), tensor_type=return_tensors, skip_tensor_conversion=["text_replacement_offsets"]
        )
        return outputs if return_dict else outputs["input_ids"]


def _saved_video_processor(path, image_processor, kwargs, overrides) -> PVCVideoProcessor:
    """The video processor saved at `path` (in `processor_config.json` or `video_preprocessor_config.json`), or that
    of the image processor's settings when the checkpoint has none; `overrides` (settings) on top."""
    hub = {key: kwargs[key] for key in HUB_OPTIONS if key in kwargs}
    try:
        config, _ = PVCVideoProcessor.get_video_processor_dict(path, **hub)
    except OSError:
        config = {}
    if config.get("video_processor_type") != PVCVideoProcessor.__name__:  # the image processor's file, read instead
        return PVCVideoProcessor.from_image_processor(image_processor, **overrides)
    return PVCVideoProcessor.from_dict({**config, **overrides}, backend=image_processor.backend)


# What `from_pretrained` passes on when it reads the video processor's configuration.
HUB_OPTIONS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")


def _check_template_variables(variables: dict, template: str, options: set):
    """Keywords that are no processor option go to the chat template, as in transformers. One that looks like a
    misspelt option is an error; one the template does not read is ignored with a warning."""
    for key in variables:
        close = difflib.get_close_matches(key, options, n=1, cutoff=0.85)
        if close:
            raise TypeError(f"apply_chat_template got an unknown option {key!r}; did you mean {close[0]!r}?")
    unused = sorted(key for key in variables if not re.search(rf"\b{re.escape(key)}\b", template))
    if unused:
        logger.warning(
            "apply_chat_template: %s %s no processor option and the chat template does not read %s: ignored.",
            ", ".join(unused),
            "is" if len(unused) == 1 else "are",
            "it" if len(unused) == 1 else "them",
        )


def _valid_options() -> dict:
    """The options of each sub-processor: `PVCProcessorKwargs`' typed dicts, less those PVC refuses."""
    valid = {modality: set(PVCProcessorKwargs.__annotations__[modality].__annotations__) for modality in MODALITIES}
    valid["audio_kwargs"] = set()  # PVC takes no audio
    return {modality: keys - set(OUTPUT_OPTIONS) - set(REFUSED_TEXT_OPTIONS) for modality, keys in valid.items()}


VALID_OPTIONS = _valid_options()
# Every keyword `PVCProcessor.__call__` takes as an option.
OPTION_NAMES = {*set().union(*VALID_OPTIONS.values()), *MODALITIES, "common_kwargs", *OUTPUT_OPTIONS, "audio", "audios"}


def assistant_mask(offsets, replacements: list[dict], spans) -> list[int]:
    """1 for each token (character `offsets` in the expanded text) that overlaps a span of the rendered, unexpanded
    text (`spans`, the template's `{% generation %}` blocks), else 0; `replacements` (the processor's
    `text_replacement_offsets`) say how far the placeholders before a span moved it."""
    mask = [0] * len(offsets)
    for start, end in spans:
        shift = {edge: 0 for edge in (start, end)}
        for replacement in replacements:
            old_end, new_end = replacement["span"][1], replacement["new_span"][1]
            for edge in shift:
                if old_end <= edge:
                    shift[edge] = new_end - old_end
        start, end = start + shift[start], end + shift[end]
        for index, (token_start, token_end) in enumerate(offsets):
            if token_start < end and token_end > start:  # empty (padding, special) tokens never overlap
                mask[index] = 1
    return mask


def _as_dict(item, what: str, example: str) -> dict:
    """A message or content item as a dict: a mapping, a dataclass or a pydantic model (fields that are None left
    out, as transformers reads them), or an object with `role` and `content`."""
    if isinstance(item, Mapping):
        return dict(item)
    if dataclasses.is_dataclass(item) and not isinstance(item, type):
        return {key: value for key, value in dataclasses.asdict(item).items() if value is not None}
    if callable(getattr(item, "model_dump", None)):
        return item.model_dump(exclude_none=True)
    if hasattr(item, "role") and hasattr(item, "content"):
        return {"role": item.role, "content": item.content}
    raise TypeError(f"A {what} must be a dict (or a dataclass or pydantic model) such as {example}; got {item!r}.")


def _as_message(message) -> dict:
    """A message as the template reads it (see `_as_dict`), its content items normalised (`_normalized_content`)."""
    message = _as_dict(message, "message", "{'role': 'user', 'content': ...}")
    if "content" not in message:
        raise ValueError(f"A {message.get('role', 'chat')} message has no content: {message}.")
    return dict(message, content=_normalized_content(message["content"]))


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


def _normalized_content(content):
    """Content items as the chat template renders them: OpenAI's image_url / video_url become image / video items;
    an item of any other unknown type is an error (it would silently vanish from the prompt)."""
    if isinstance(content, str):
        return content
    items = []
    for item in content:
        item = _as_dict(item, "content item", "{'type': 'text', 'text': ...}")
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


def _nested_images(images) -> bool:
    """Whether images come per sample: a list of lists (one list per prompt)."""
    return isinstance(images, (list, tuple)) and any(isinstance(item, (list, tuple)) for item in images)


def _nested_videos(videos) -> bool:
    """Whether videos come per sample: a list of lists of videos (a list of frames is one video, not a sample)."""
    lists = [item for item in videos if isinstance(item, (list, tuple))] if isinstance(videos, (list, tuple)) else []
    return bool(lists) and not any(item and all(_is_frame(frame) for frame in item) for item in lists)


def _check_per_sample(texts: list[str], media, placeholder: str, name: str, nested: bool):
    """Media nested per sample ([[a, b], [c]]) must hold, for each prompt, as many items as its placeholders, as
    transformers' Idefics3, SmolVLM and Mllama processors check: a sample's media are never dealt to another."""
    if not nested:
        return
    if not all(isinstance(item, (list, tuple)) for item in media) or len(media) != len(texts):
        raise ValueError(
            f"{name} mix per-sample lists and single items, or give {len(media)} lists for {len(texts)} prompts: pass "
            f"one list of {name} per prompt (empty for none), or a flat list in text order."
        )
    for index, (sample, items) in enumerate(zip(texts, media)):
        wanted = sample.count(placeholder)
        given = len(items) if name == "images" else len(_flatten_videos(list(items)) if items else [])
        if wanted != given:
            raise ValueError(
                f"Prompt {index} holds {wanted} {placeholder} placeholder(s) but its list of {name} has {given}: each "
                f"prompt's list must hold its own {name}, one per {placeholder}."
            )


def _refuse_audio(*given):
    """`audio` / `audios`: None or empty (what tools that serve every model pass), never sound."""
    for audio in given:
        if audio is not None and not (isinstance(audio, (list, tuple)) and not audio):
            raise ValueError("PVC takes images and videos, not audio: pass audio=None (or leave it out).")


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
