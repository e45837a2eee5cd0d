"""`--model pvc` for lmms-eval: PVC answering a task's requests as `apply_chat_template` + `generate` would.

    lmms-eval --model pvc --model_args pretrained=PATH[,preset=NAME,num_frames=N,...] --tasks TASKS --batch_size B

Each request's messages (the task's `doc_to_messages`, or lmms-eval's own from `doc_to_visual` and `doc_to_text`)
go through the checkpoint's processor and chat template: images as PIL pictures, videos as paths sampled by the
processor's own frame sampling. Requests with the same generation options are batched (left padding; images and
videos may share a batch). Generation stops where the checkpoint's generation config says (its end-of-turn token),
and at the task's `until` strings. The model options:

    pretrained           the checkpoint (a folder or Hub id), required
    preset               the paper's settings for one benchmark (see `presets.PRESETS`): mvbench, chartqa, ...
    num_frames           frames sampled per video (default: the checkpoint processor's)
    max_tiles            tile limit per image (default: the checkpoint processor's)
    video_max_tiles      tile limit per video frame (default: the checkpoint processor's, 1)
    dtype                auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16 or float16
    attn_implementation  sdpa, eager or flash_attention_2 (default: transformers' choice)
    device_map           passed to from_pretrained (e.g. auto, to spread a large model over GPUs)
    max_new_tokens       overrides the task's (without either: the generation config's, else 256)
    num_beams            overrides the task's and the preset's

lmms-eval's `--device` and `--batch_size` are honoured. Only generation tasks are answered (`generate_until`).
"""

import json
import logging
from collections import defaultdict

import torch
from lmms_eval.api.model import lmms
from lmms_eval.protocol import ChatMessages
from tqdm import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor

from ..configuration_pvc import PVCConfig
from ..conversion.options import DTYPE_NAMES, missing_folder_message
from ..video_decoding_pvc import read_video
from .presets import get_preset

logger = logging.getLogger(__name__)

PROCESSOR_OPTIONS = ("num_frames", "max_tiles", "video_max_tiles")
# lmms-eval's generation options that `generate` takes as they are (temperature and top_p only when sampling)
GENERATE_OPTIONS = ("max_new_tokens", "min_new_tokens", "num_beams", "top_k", "repetition_penalty", "length_penalty")
SAMPLING_OPTIONS = ("temperature", "top_p")
DEFAULT_MAX_NEW_TOKENS = 256


class PVCLmmsEval(lmms):
    is_simple = False  # a chat model: lmms-eval hands it each request's messages

    def __init__(
        self,
        pretrained: str | None = None,
        preset: str | None = None,
        num_frames: int | None = None,
        max_tiles: int | None = None,
        video_max_tiles: int | None = None,
        dtype: str = "auto",
        attn_implementation: str | None = None,
        device: str | None = None,
        device_map: str | None = None,
        max_new_tokens: int | None = None,
        num_beams: int | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,  # lmms-eval passes it to every model; batch sizes here are fixed
        **unknown,
    ) -> None:
        super().__init__()
        if unknown:
            raise TypeError(
                f"--model pvc got unknown model_args {sorted(unknown)}; its options are pretrained, preset, "
                "num_frames, max_tiles, video_max_tiles, dtype, attn_implementation, device_map, max_new_tokens, "
                "num_beams (see pvc.evaluation.lmms_eval_model)."
            )
        if not pretrained:
            raise ValueError("--model pvc needs the checkpoint: --model_args pretrained=PATH_OR_HUB_ID")
        self.preset = get_preset(preset)
        self._batch_size = _batch_size(batch_size)
        self._rank, self._world_size, device = _processes(device)
        torch_dtype = _dtype(dtype, device)
        _check_checkpoint(str(pretrained))
        loading = dict(dtype=torch_dtype, device_map=device_map or device)
        if attn_implementation is not None:
            loading["attn_implementation"] = attn_implementation
        # The checkpoint's own code, loaded as a user loads it (the answers are those of their own `generate`)
        self.model = AutoModelForImageTextToText.from_pretrained(pretrained, trust_remote_code=True, **loading).eval()
        self.processor = AutoProcessor.from_pretrained(pretrained, trust_remote_code=True)
        self._device = self.model.device
        given = dict(num_frames=num_frames, max_tiles=max_tiles, video_max_tiles=video_max_tiles, num_beams=num_beams)
        settings = {**(self.preset.settings if self.preset else {})}
        settings.update({key: value for key, value in given.items() if value is not None})  # the user's win
        self.processor_options = {key: settings[key] for key in PROCESSOR_OPTIONS if key in settings}
        self.num_beams = settings.get("num_beams")
        self.max_new_tokens = max_new_tokens
        self._ignored_options: set[str] = set()

    # lmms-eval reads these
    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    # ------------------------------------------------------------------------------------------------ requests

    def generate_until(self, requests) -> list[str]:
        """One answer per request, in the requests' order. Requests with the same generation options are answered
        `batch_size` at a time."""
        answers: list[str | None] = [None] * len(requests)
        groups = defaultdict(list)
        for index, request in enumerate(requests):
            groups[json.dumps(request.args[2], sort_keys=True, default=str)].append(index)
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="PVC answering")
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                for index, answer in zip(chunk, self._answer([requests[index] for index in chunk])):
                    answers[index] = answer
                    context, _, options = requests[index].args[:3]
                    self.cache_hook.add_partial("generate_until", (context, options), answer)
                progress.update(len(chunk))
        progress.close()
        return answers

    def loglikelihood(self, requests):
        tasks = sorted({request.task_name for request in requests})
        raise NotImplementedError(
            f"--model pvc answers generation tasks (output_type: generate_until); {', '.join(tasks)} asks for "
            "log-likelihoods. Use the benchmark's generation task instead (e.g. perceptiontest_val_mc, not "
            "perceptiontest_val_mcppl)."
        )

    def generate_until_multi_round(self, requests):
        tasks = sorted({request.task_name for request in requests})
        raise NotImplementedError(
            f"--model pvc answers single-round generation tasks (output_type: generate_until); {', '.join(tasks)} is "
            "a multi-round task."
        )

    def _answer(self, requests) -> list[str]:
        conversations = [self.conversation(request) for request in requests]
        inputs = self.processor.apply_chat_template(
            conversations,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            **self.processor_options,
        ).to(self.device)
        options, until = self.generation_options(requests[0].args[2])
        with torch.inference_mode():
            output = self.model.generate(**inputs, **options)
        texts = self.processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return [_cut(text, until) for text in texts]

    def conversation(self, request) -> list[dict]:
        """A request's messages as this processor's chat template takes them; with a preset that has its own
        prompt, the user's text is that prompt."""
        _, doc_to_messages, _, doc_id, task, split = request.args
        doc = self.task_dict[task][split][doc_id]
        messages = ChatMessages(messages=doc_to_messages(doc)).to_hf_messages()
        for message in messages:
            message["content"] = [self._content_item(item, task) for item in message["content"]]
        if self.preset is not None and self.preset.prompt is not None:
            user = [message for message in messages if message["role"] == "user"][-1]
            user["content"] = [item for item in user["content"] if item["type"] != "text"]
            user["content"].append({"type": "text", "text": self.preset.prompt(doc)})
        return messages

    def _content_item(self, item: dict, task: str) -> dict:
        kind = item["type"]
        if kind in ("text", "image"):
            return item
        if kind == "video":
            return self._video_item(item)
        raise ValueError(f"Task {task} sends {kind} input; PVC reads text, images and videos only.")

    def _video_item(self, item: dict) -> dict:
        """A video as the processor takes it: a path (sampled by the processor), or, for a time window of a file,
        the window's frames, sampled here by the same rule (the processor then keeps them all)."""
        video = item["video"]
        start, end = item.get("video_start"), item.get("video_end")
        if isinstance(video, dict):  # lmms-eval's form for a window: {"path": ..., "video_start": ..., ...}
            start, end = video.get("video_start", start), video.get("video_end", end)
            video = video.get("path") or video.get("url") or video.get("video")
        if start is None and end is None:
            return {"type": "video", "video": video}
        num_frames = self.processor_options.get("num_frames") or self.processor.video_processor.num_frames
        frames = read_video(str(video), num_frames, start=start, end=end)
        return {"type": "video", "video": frames}

    def generation_options(self, task_options: dict) -> tuple[dict, list[str]]:
        """`generate` keywords from a task's generation options (sampling when the temperature is above 0, or
        without a temperature when `do_sample` is on; otherwise greedy),
        with this model's `max_new_tokens` and `num_beams` (or its preset's) in front; and the `until` strings.
        The end of generation is the checkpoint's generation config's (its end-of-turn token)."""
        task_options = dict(task_options or {})
        until = task_options.pop("until", None) or []
        until = [until] if isinstance(until, str) else [text for text in until if text]
        temperature = task_options.get("temperature")
        sampling = float(temperature) > 0 if temperature is not None else bool(task_options.get("do_sample"))
        options = {key: task_options[key] for key in GENERATE_OPTIONS if task_options.get(key) is not None}
        options["do_sample"] = sampling
        if sampling:
            options.update({key: task_options[key] for key in SAMPLING_OPTIONS if task_options.get(key) is not None})
        options.setdefault("max_new_tokens", self.model.generation_config.max_new_tokens or DEFAULT_MAX_NEW_TOKENS)
        if self.max_new_tokens is not None:
            options["max_new_tokens"] = self.max_new_tokens
        if self.num_beams is not None:
            options["num_beams"] = self.num_beams
        ignored = set(task_options) - set(GENERATE_OPTIONS) - set(SAMPLING_OPTIONS) - {"do_sample"}
        if ignored - self._ignored_options:
            logger.warning("--model pvc ignores the task's generation options %s.", sorted(ignored))
            self._ignored_options |= ignored
        return options, until


def _cut(text: str, until: list[str]) -> str:
    """The answer up to the first of the `until` strings."""
    for stop in until:
        text = text.split(stop, 1)[0]
    return text


def _batch_size(value) -> int:
    text = str(value)
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"--model pvc takes a whole --batch_size of 1 or more; got {value!r} (auto is not supported).")
    return int(text)


def _processes(device: str | None) -> tuple[int, int, str]:
    """This process's rank, the number of processes (`accelerate launch` runs one per GPU, lmms-eval splits the
    documents between them) and its device."""
    from accelerate import PartialState

    state = PartialState()
    if state.num_processes > 1:
        return state.process_index, state.num_processes, f"cuda:{state.local_process_index}"
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}, but this machine has no CUDA device: pass --device cpu.")
    return 0, 1, str(device)


def _dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    name = DTYPE_NAMES.get(name, name)
    if name not in DTYPE_NAMES.values():
        raise ValueError(f"dtype must be auto, {', '.join(DTYPE_NAMES.values())}; got {name!r}.")
    return getattr(torch, name)


def _check_checkpoint(pretrained: str):
    """A missing folder, or a checkpoint that is not PVC's (an InternVL2 one, say), said before anything loads."""
    problem = missing_folder_message(pretrained)
    if problem:
        raise ValueError(f"--model pvc: {problem}")
    try:
        config, _ = PVCConfig.get_config_dict(pretrained)
    except OSError as error:
        raise ValueError(f"--model pvc could not read the checkpoint {pretrained}: {error}") from None
    if config.get("model_type") != PVCConfig.model_type:
        raise ValueError(
            f"{pretrained} is a {config.get('model_type')!r} checkpoint, not PVC's; convert it first: "
            f"pvc-convert --src {pretrained} --dst PVC_FOLDER"
        )
