"""PVCProcessor: text with `<image>` / `<video>` placeholders, images and videos -> model inputs.

Each `<image>` becomes `<img>` + `<IMG_CONTEXT>` x (tokens_per_frame x image_repeat x tiles) + `</img>`, each
`<video>` becomes one `Frame{i}: <img>` + `<IMG_CONTEXT>` x (tokens_per_frame x tiles) + `</img>` line per frame
(the frame prompt of InternVL2 and PVC), so the text holds exactly as many context tokens as the model makes
features.
"""

import re

import torch
from transformers import BatchFeature, ProcessorMixin

from .image_processing_pvc import _flatten, _flatten_videos

IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER = "<image>", "<video>"
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
    """

    def __init__(
        self, image_processor=None, tokenizer=None, chat_template=None, tokens_per_frame=64, image_repeat=4, **kwargs
    ):
        if chat_template is None:
            chat_template = build_chat_template("chatml")
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.tokens_per_frame = tokens_per_frame
        self.image_repeat = image_repeat

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", *self.image_processor.model_input_names, "visual_order"]

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
            Other keyword arguments: `max_tiles` for images; `num_frames`, `fps`, `max_frames`, `start`, `end`,
            `video_max_tiles` for videos (see `PVCImageProcessor`); the rest go to the tokenizer.

        Returns:
            `BatchFeature` with `input_ids`, `attention_mask`, `pixel_values` + `image_num_tiles`,
            `pixel_values_videos` + `video_num_frames` + `video_num_tiles`, and `visual_order` (0 image, 1 video, in
            text order) when both images and videos are given.
        """
        pixel_options = {
            key: kwargs.pop(key)
            for key in ("max_tiles", "num_frames", "fps", "max_frames", "start", "end", "video_max_tiles")
            if key in kwargs
        }
        images = None if images is None else _flatten(images)
        videos = None if videos is None else _flatten_videos(videos)
        texts = [] if text is None else [text] if isinstance(text, str) else list(text)
        kinds = [match.group() for sample in texts for match in re.finditer(r"<image>|<video>", sample)]
        for placeholder, given, name in ((IMAGE_PLACEHOLDER, images, "images"), (VIDEO_PLACEHOLDER, videos, "videos")):
            expected = kinds.count(placeholder)
            if text is not None and expected != len(given or []):  # checked before any media is decoded
                raise ValueError(
                    f"The text holds {expected} {placeholder} placeholder(s) but {len(given or [])} {name} were "
                    f"given: put one {placeholder} in the text where each of the {name} goes."
                )
        visual = {}
        if images is not None or videos is not None:
            visual = dict(self.image_processor(images=images, videos=videos, return_tensors="pt", **pixel_options))
        if text is None:
            return BatchFeature(data=visual, tensor_type=return_tensors)

        expansions = self.expansions(kinds, visual)
        expanded = [re.sub(r"<image>|<video>", lambda _: next(expansions), sample) for sample in texts]
        for token in (IMAGE_START, IMAGE_END, IMAGE_CONTEXT):
            self.token_id(token)
        encoding = self.tokenizer(
            expanded, padding=padding, padding_side=padding_side, return_tensors=return_tensors, **kwargs
        )
        data = {**encoding, **visual}
        if images and videos:
            data["visual_order"] = torch.tensor([int(kind == VIDEO_PLACEHOLDER) for kind in kinds])
        return BatchFeature(data=data, tensor_type=return_tensors)

    def expansions(self, kinds, visual):
        """The replacement text of each placeholder kind, in order, for the processed `visual` inputs."""
        image_tiles = iter(visual.get("image_num_tiles", torch.empty(0)).tolist())
        video_shapes = iter(
            zip(
                visual.get("video_num_frames", torch.empty(0)).tolist(),
                visual.get("video_num_tiles", torch.empty(0)).tolist(),
            )
        )
        for kind in kinds:
            yield (
                self.image_prompt(next(image_tiles))
                if kind == IMAGE_PLACEHOLDER
                else self.video_prompt(*next(video_shapes))
            )

    def apply_chat_template(
        self,
        conversation,
        chat_template=None,
        add_generation_prompt=False,
        tokenize=False,
        return_dict=False,
        return_tensors=None,
        **kwargs,
    ):
        r"""
        Render one conversation (a list of messages) or a batch of them. Content items: `{"type": "text", "text":
        ...}`, `{"type": "image", "image" | "path" | "url": ...}` and `{"type": "video", "path" | "video": ...}`.
        With `tokenize=True` the media are loaded and the result is this processor's output (a `BatchFeature`
        when `return_dict=True`, else the `input_ids`); otherwise the prompt text(s).
        """
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        conversations = conversation if batched else [conversation]
        template = chat_template if chat_template is not None else self.chat_template
        texts = [
            self.tokenizer.apply_chat_template(
                messages, chat_template=template, add_generation_prompt=add_generation_prompt, tokenize=False
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
                    if item.get("type") == "image":
                        images.append(_media(item, ("image", "path", "url")))
                    elif item.get("type") == "video":
                        videos.append(_media(item, ("video", "path", "url")))
        outputs = self(
            text=texts, images=images or None, videos=videos or None, return_tensors=return_tensors, **kwargs
        )
        return outputs if return_dict else outputs["input_ids"]


def _media(item: dict, keys) -> object:
    for key in keys:
        if item.get(key) is not None:
            return item[key]
    raise ValueError(f"A {item.get('type')} content item needs one of the keys {list(keys)}; got {sorted(item)}.")


__all__ = ["PVCProcessor", "build_chat_template"]
