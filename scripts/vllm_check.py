"""vLLM against transformers' `generate` on a small PVC: run by scripts/test_vllm.sh in .venv-vllm.

    python scripts/vllm_check.py WORK_DIR

Builds a small random PVC (language-model head size 64, which vLLM's CPU attention takes; tiles of 56px, at most 6
an image, so an image has several) and saves it with its processor in WORK_DIR/model. Then, for each case, the greedy tokens and
the top-3 log-probabilities of every generated token from vLLM (the repo's model code through vLLM's Transformers
backend, as `pvc-serve` runs it) must equal those of `generate` (tokens exactly, log-probabilities to 1e-3):
one image with several tiles, an image with the most tiles there are (more than a square image gets), two images
in one prompt, a video, an image and a video in one prompt, all of these
submitted together as one batch, the same batch again with `max_num_batched_tokens` small enough that prompts
are prefilled in chunks, and again with the model split over two tensor-parallel processes. Prints one line per case and exits non-zero on the first difference.
"""

import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

NEW_TOKENS, TOP = 6, 3


def build(folder: Path) -> Path:
    from conftest import TINY_TEXT, randomize_, tiny_config, tiny_processor

    from pvc import PVCForConditionalGeneration

    torch.manual_seed(0)
    config = tiny_config("pvc")
    config.text_config = type(config.text_config)(
        **dict(TINY_TEXT, hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1)
    )  # head size 64
    model = randomize_(PVCForConditionalGeneration(config), seed=0).eval()
    path = folder / "model"
    model.save_pretrained(path)
    tiny_processor(max_tiles=6).save_pretrained(path)
    return path


def picture(width, height, seed):
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 255, (height, width, 3), dtype=np.uint8))


def clip(frames, seed):
    return np.random.RandomState(seed).randint(0, 255, (frames, 40, 48, 3), dtype=np.uint8)


def cases():
    """name -> (content items in order, images, videos)."""
    return {
        "one image, 3x1 tiles + thumbnail": ([("image", "What is it?")], [picture(168, 56, 1)], []),
        # the most tiles an image can have at max_tiles=6 (3 x 2 + thumbnail, 112 tokens), more than any square
        # image (2 x 2 + thumbnail, 80): vLLM must have profiled this shape, or its encoder cache is too small at
        # the chunked-prefill budget below (64 tokens)
        "a 3:2 photo, 3x2 tiles + thumbnail": ([("image", "And this?")], [picture(168, 112, 7)], []),
        "two images": ([("image", ""), ("image", "Compare them.")], [picture(112, 112, 2), picture(56, 70, 3)], []),
        "a video": ([("video", "What happens?")], [], [clip(6, 4)]),
        "an image and a video": ([("image", ""), ("video", "Describe both.")], [picture(112, 56, 5)], [clip(5, 6)]),
    }


def prompt(processor, items):
    content = []
    for kind, text in items:
        content.append({"type": kind})
        if text:
            content.append({"type": "text", "text": text})
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def reference(path, processor):
    """Greedy tokens and top-3 log-probabilities per step from transformers' `generate`."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
    results = {}
    for name, (items, images, videos) in cases().items():
        inputs = processor(text=prompt(processor, items), images=images or None, videos=videos or None)
        out = model.generate(
            **inputs,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
        tokens = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
        tops = []
        for scores in out.scores:
            logprobs = torch.log_softmax(scores[0].float(), -1)
            values, ids = logprobs.topk(TOP)
            tops.append(dict(zip(ids.tolist(), values.tolist())))
        results[name] = (tokens, tops)
    return results


def compare(name, expected, output) -> bool:
    tokens, tops = expected
    got_tokens = list(output.outputs[0].token_ids)
    steps = output.outputs[0].logprobs or []
    ok = got_tokens == tokens and len(steps) == len(tops)
    worst = 0.0
    for top, logprobs in zip(tops, steps):
        for token, value in top.items():
            if token not in logprobs:
                ok = False
                continue
            worst = max(worst, abs(logprobs[token].logprob - value))
    ok = ok and worst < 1e-3
    print(
        f"{'ok  ' if ok else 'FAIL'} {name}: tokens {got_tokens} (generate {tokens}), top-{TOP} logprob diff {worst:.1e}"
    )
    return ok


def main(folder: Path):
    from transformers import AutoProcessor
    from vllm import LLM, SamplingParams

    from pvc.serving import vllm_options

    path = build(folder)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    expected = reference(path, processor)
    requests = {
        name: {
            "prompt": prompt(processor, items),
            "multi_modal_data": {key: value for key, value in (("image", images), ("video", videos)) if value},
        }
        for name, (items, images, videos) in cases().items()
    }
    sampling = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, logprobs=TOP)
    ok = True
    runs = [("", {}), (", chunked prefill", {"max_num_batched_tokens": 64})]
    if (os.cpu_count() or 1) >= 2:  # two worker processes, one core each (vLLM's CPU backend binds them)
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0|1")
        runs.append((", tensor parallel 2", {"tensor_parallel_size": 2}))
    else:
        print("skip tensor parallelism: it needs 2 CPU cores")
    for label, options in runs:
        llm = LLM(
            model=str(path),
            dtype="float32",
            enforce_eager=True,
            max_model_len=2048,
            limit_mm_per_prompt={"image": 2, "video": 1},
            **vllm_options(),
            **options,
        )
        if not label:
            for name, request in requests.items():  # one at a time
                ok &= compare(name, expected[name], llm.generate([request], sampling, use_tqdm=False)[0])
        outputs = llm.generate(list(requests.values()), sampling, use_tqdm=False)  # together
        for name, output in zip(requests, outputs):
            ok &= compare(f"{name} (in a batch{label})", expected[name], output)
        del llm
    return 0 if ok else 1


if __name__ == "__main__":  # vLLM spawns workers that import this file
    sys.exit(main(Path(sys.argv[1])))
