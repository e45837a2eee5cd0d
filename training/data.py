"""Conversation datasets for fine-tuning PVC and the collator that turns records into a training batch.

A record (one line of a JSONL file, or one item of a JSON list) in the common LLaVA/InternVL format:

    {"image": "cat.jpg",                      # or "images": [...], or "video": "clip.mp4" (or "videos")
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}]}

Media paths are relative to `media_root`; images may also be PIL images and videos arrays. A record with media
but no placeholder gets `<image>`/`<video>` lines at the start of its first human turn, as InternVL does.
"""

import json
import logging
import os
import re
from pathlib import Path

import torch

from ..processing_pvc import assistant_mask
from ..visuals_pvc import visual_order

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """Training data that cannot be used: the message names the file and record (or line) and what is wrong."""


ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
PLACEHOLDER = re.compile(r"<image>|<video>")


def load_records(path) -> list[dict]:
    """Records from a .json (a list) or .jsonl file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Training data not found: {path} (a .json list or a .jsonl file of records).")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":  # each record named by its line, blank lines counted
        lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
        records = [_json(line, path, number) for number, line in lines]
        places = [f"{path}: line {number}" for number, _ in lines]
    else:
        records = _json(text, path)
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a list of records, got a {type(records).__name__}.")
        places = [f"{path}: record {number}" for number in range(1, len(records) + 1)]
    for record, where in zip(records, places):
        if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
            raise DataError(f"{where} has no 'conversations' list: {str(record)[:200]}")
        record["_where"] = where
    return records


def record_problem(record: dict, media_root=None) -> str | None:
    """What is wrong with a record before any media is read, or None: turns without text, unknown roles, a
    conversation that does not start with a human turn or has no answer, local media files that are missing."""
    turns = record["conversations"]
    roles = []
    for number, turn in enumerate(turns, 1):
        role = ROLES.get(turn.get("from", turn.get("role"))) if isinstance(turn, dict) else None
        if role is None:
            return f"turn {number} has an unknown role ({str(turn)[:80]}); use human/gpt (or user/assistant/system)"
        text = turn.get("value", turn.get("content"))
        if not isinstance(text, str):
            return f"turn {number} has no text (its value is {text!r})"
        roles.append(role)
    spoken = [role for role in roles if role != "system"]
    if not spoken or spoken[0] != "user":
        return "the conversation does not start with a human turn"
    if "assistant" not in spoken:
        return "the conversation has no assistant (gpt) turn to train on"
    texts = [turn.get("value", turn.get("content")) for turn in turns]
    for number, (role, text) in enumerate(zip(roles, texts), 1):
        if role != "user" and PLACEHOLDER.search(text):
            return f"turn {number} ({role}) holds {PLACEHOLDER.search(text).group()}; media go in human turns"
    for key in ("image", "images", "video", "videos"):
        if (key in record and record[key] is None) or any(item is None for item in _as_list(record.get(key))):
            return f"its {key!r} is null"
    placed = PLACEHOLDER.findall("".join(texts))
    for kind, keys in (("<image>", ("image", "images")), ("<video>", ("video", "videos"))):
        count = sum(len(_as_list(record.get(key))) for key in keys)
        if placed and placed.count(kind) != count:  # without any placeholder, they are added (see messages)
            return f"it has {placed.count(kind)} {kind} placeholders but {count} {kind[1:-1]}s"
    for key in ("image", "images", "video", "videos"):
        for item in _as_list(record.get(key)):
            if isinstance(item, str) and not item.startswith(("http://", "https://", "data:")):
                if not os.path.isabs(item) and media_root is None:
                    continue  # relative to a media root the dataset was not told: the collator finds out
                path = Path(media_root) / item if not os.path.isabs(item) else Path(item)
                if not path.exists():
                    relative = not os.path.isabs(item) and Path(media_root) == Path(os.curdir)
                    hint = (
                        " (relative paths start at the working folder; --media-root names another)" if relative else ""
                    )
                    return f"its media file {path} does not exist{hint}"
    return None


def _json(text: str, path: Path, line: int | None = None):
    """Parsed JSON; a syntax error names the file and the line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        line = error.lineno if line is None else line
        raise DataError(f"{path}: line {line} is not valid JSON ({error.msg}, column {error.colno}).") from None


class ConversationDataset(torch.utils.data.Dataset):
    """Records as they are, checked up front (see `record_problem`); media are loaded by the collator (in the
    data-loader workers). A bad record is an error naming its file and number, or with `skip_bad=True` is left out
    (counted in `skipped`, and logged)."""

    def __init__(self, records, media_root=None, skip_bad: bool = False):
        records = load_records(records) if isinstance(records, (str, os.PathLike)) else list(records)
        self.records, self.skipped = [], []
        for number, record in enumerate(records, 1):
            problem = record_problem(record, media_root)
            if problem is None:
                self.records.append(record)
                continue
            where = record.get("_where", f"record {number}")
            if not skip_bad:
                raise DataError(f"{where}: {problem}. Fix it, or pass --skip-bad-records to leave such records out.")
            self.skipped.append(f"{where}: {problem}")
        if self.skipped:
            logger.warning("Left out %d bad records, the first: %s", len(self.skipped), self.skipped[0])

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        return self.records[index]


class PVCDataCollator:
    r"""
    Records -> a padded batch with `labels` that train only on the assistant turns (their text and end-of-turn
    token); the prompt, the system and user turns, padding and visual tokens are -100.

    Args:
        processor (`PVCProcessor`).
        media_root (`str`, *optional*): folder that relative media paths start from.
        max_num_frames (`int` or `(low, high)`, *optional*): frames sampled per video (default: the processor's);
            a range draws each record's count uniformly from low..high (the paper trains on 16..96).
        max_tiles (`int`, *optional*): tile bound per image (default: the processor's).
        max_length (`int`, *optional*): a longer sample is cut at the end when its visual tokens all lie before
            the cut (with a warning), and is an error otherwise.
        skip_bad (`bool`): a record that fails as its media are read (an unreadable file, a cut through its visual
            tokens) is left out of its batch and counted in `skipped`, instead of ending the run with an error
            that names it.
        fallback (sequence of records, *optional*): with `skip_bad`, where a batch whose every record was bad
            (a batch of one, say) takes a stand-in, the next usable record in turn; usually the training dataset.
    """

    def __init__(
        self,
        processor,
        media_root=None,
        max_num_frames=None,
        max_tiles=None,
        max_length=None,
        skip_bad=False,
        fallback=None,
    ):
        for name, value in (("max_tiles", max_tiles), ("max_length", max_length)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a whole number of at least 1 (or None), got {value!r}")
        counts = max_num_frames if isinstance(max_num_frames, (tuple, list)) else (max_num_frames, max_num_frames)
        if max_num_frames is not None and not (
            len(counts) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) for n in counts)
            and 1 <= counts[0] <= counts[1]
        ):
            raise ValueError(
                f"max_num_frames must be a frame count of at least 1 or a range (low, high), got {max_num_frames!r}"
            )
        self.processor = processor
        self.skip_bad, self.skipped = skip_bad, []
        self.fallback, self._next_fallback, self._bad = fallback, 0, set()
        self.media_root = Path(media_root) if media_root else None
        self.max_num_frames = max_num_frames
        self.max_tiles = max_tiles
        self.max_length = max_length
        tokenizer = processor.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.image_token_id = processor.token_id("<IMG_CONTEXT>")
        self.pixel_input_names = [
            *processor.image_processor.model_input_names,
            *processor.video_processor.model_input_names,
        ]

    def __call__(self, records: list[dict]) -> dict:
        samples = [sample for sample in map(self._encode_or_skip, records) if sample is not None]
        if not samples:  # skipped means skipped: another record stands in, so the step still has data
            samples = [self._stand_in()]
        length = max(len(sample["input_ids"]) for sample in samples)
        batch = {
            "input_ids": torch.tensor(
                [s["input_ids"] + [self.pad_id] * (length - len(s["input_ids"])) for s in samples]
            ),
            "attention_mask": torch.tensor(
                [[1] * len(s["input_ids"]) + [0] * (length - len(s["input_ids"])) for s in samples]
            ),
            "labels": torch.tensor([s["labels"] + [-100] * (length - len(s["labels"])) for s in samples]),
        }
        for key in self.pixel_input_names:  # the pixel inputs and their counts
            parts = [s[key] for s in samples if key in s]
            if parts:
                batch[key] = torch.cat(parts)
        kinds = [kind for s in samples for kind in s["kinds"]]
        if "<image>" in kinds and "<video>" in kinds:
            batch["visual_order"] = visual_order(kinds)
        return batch

    def _encode_or_skip(self, record: dict) -> dict | None:
        """`encode`, or with `skip_bad` None for a record that fails once its media are read (counted, logged)."""
        where = record.get("_where", "a record") if isinstance(record, dict) else "a record"
        try:
            return self.encode(record)
        except (ValueError, OSError) as error:  # found only once its media are read: named, or left out
            if not self.skip_bad:
                raise DataError(f"{where}: {error}") from error
            if where not in self._bad:
                self._bad.add(where)
                self.skipped.append(f"{where}: {error}")
                logger.warning("Left out %s: %s", where, error)
            return None

    def _stand_in(self) -> dict:
        """The next usable record of `fallback` (in turn, wrapping round), for a batch that lost all its records."""
        records = self.fallback if self.fallback is not None else []
        for _ in range(len(records)):
            record = records[self._next_fallback % len(records)]
            self._next_fallback += 1
            if record.get("_where") in self._bad:
                continue
            sample = self._encode_or_skip(record)
            if sample is not None:
                return sample
        raise DataError(
            f"Every record of a batch was bad (the last: {self.skipped[-1]}) and "
            + ("no other record could stand in." if records else "the collator was given no fallback records.")
        )

    def encode(self, record: dict) -> dict:
        """One record -> input ids, labels, pixel inputs and the kinds of its visuals in text order. The processor
        itself expands and tokenizes the chat text (as `apply_chat_template` does); where each token came from
        (its offsets) and where each placeholder went (its replacement offsets) give the spans to train on."""
        images = _as_list(record.get("images", record.get("image")))
        videos = _as_list(record.get("videos", record.get("video")))
        messages = self.messages(record, len(images), len(videos))
        text, spans = self.render(messages)
        kinds = PLACEHOLDER.findall(text)
        if kinds.count("<image>") != len(images) or kinds.count("<video>") != len(videos):
            raise ValueError(
                f"A record has {kinds.count('<image>')} <image> and {kinds.count('<video>')} <video> placeholders but "
                f"{len(images)} images and {len(videos)} videos: {str(record)[:200]}"
            )
        frames = self.max_num_frames
        if isinstance(frames, (tuple, list)):  # a range: torch's generator, which Trainer seeds
            frames = int(torch.randint(frames[0], frames[1] + 1, ()).item())
        options = {
            key: value for key, value in (("max_tiles", self.max_tiles), ("num_frames", frames)) if value is not None
        }
        out = self.processor(
            text=text,
            images=[self._path(image) for image in images] or None,
            videos=[self._path(video) for video in videos] or None,
            return_offsets_mapping=True,
            return_text_replacement_offsets=True,
            **options,
        )
        ids = out["input_ids"][0].tolist()
        trained = assistant_mask(out["offset_mapping"][0].tolist(), out["text_replacement_offsets"][0], spans)
        labels = [token if keep and token != self.image_token_id else -100 for token, keep in zip(ids, trained)]
        ids, labels = self.truncate(ids, labels)
        visual = {key: out[key] for key in self.pixel_input_names if key in out}
        return {"input_ids": ids, "labels": labels, "kinds": kinds, **visual}

    def messages(self, record: dict, num_images: int, num_videos: int) -> list[dict]:
        messages = []
        for turn in record["conversations"]:
            role = ROLES.get(turn.get("from", turn.get("role")))
            if role is None:
                raise ValueError(f"Unknown conversation role in {turn}; use human/gpt (or user/assistant/system).")
            messages.append({"role": role, "content": turn.get("value", turn.get("content", ""))})
        placeholders = "".join(message["content"] for message in messages)
        if (num_images or num_videos) and not PLACEHOLDER.search(placeholders):
            first_user = next((message for message in messages if message["role"] == "user"), None)
            if first_user is None:
                raise ValueError(f"A record with media has no human turn to put them in: {str(record)[:200]}")
            first_user["content"] = "<image>\n" * num_images + "<video>\n" * num_videos + first_user["content"]
        return messages

    def render(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The chat text and the character spans to train on: each assistant turn's content and end of turn."""
        render = lambda part, prompt: self.processor.apply_chat_template(part, add_generation_prompt=prompt)  # noqa: E731
        spans = []
        for index, message in enumerate(messages):
            if message["role"] == "assistant":
                start = len(render(messages[:index], True))
                spans.append((start, len(render(messages[: index + 1], False))))
        return render(messages, False), spans

    def truncate(self, ids, labels):
        if self.max_length is None or len(ids) <= self.max_length:
            return ids, labels
        if self.image_token_id in ids[self.max_length :]:
            raise ValueError(
                f"A sample has {len(ids)} tokens, more than max_length={self.max_length}, and the cut would split "
                "its visual tokens: lower max_tiles / max_num_frames or raise max_length."
            )
        logger.warning("A sample of %d tokens is cut to max_length=%d.", len(ids), self.max_length)
        return ids[: self.max_length], labels[: self.max_length]

    def _path(self, media):
        """A relative media path under `media_root`; absolute paths, URLs and in-memory media as they are."""
        if not isinstance(media, (str, os.PathLike)) or self.media_root is None or Path(media).is_absolute():
            return media
        return media if str(media).startswith(("http://", "https://")) else str(self.media_root / media)


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
