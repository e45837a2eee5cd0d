"""lmms-eval's `--model pvc` checked offline, end to end, with the demo model (scripts/test_lmms_eval.sh runs this
with pytest in .venv-lmms; the main suite does not need lmms-eval).

Two small local tasks in real benchmark formats are written first: DocVQA's columns (`questionId`, `question`,
`image`, `answers`, ...) with generated pictures, and MVBench's (`video`, `question`, `candidates`, `answer`) with
generated mp4 files, read by lmms-eval from parquet and scored by lmms-eval's own DocVQA and MVBench code. Then:
the answers lmms-eval logs equal the demo model's direct `apply_chat_template` + `generate` (built here from the
task formats, not through the plugin), at batch size 1 and 2; a preset changes what it says it changes; a wrong
run fails loudly; the serving route (`openai_compatible` against a `pvc-serve` server) is in scripts/test_vllm.sh.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demo_model"
RECORDS = 3  # per task: with batch size 2 a batch holds an image request and a video request
# Both tasks' generation options, the same so that their requests can share a batch (the toy answers are 64
# characters long)
GENERATION = {"max_new_tokens": 70, "temperature": 0, "top_p": 1.0, "num_beams": 1, "do_sample": False}
# The prompts lmms-eval's DocVQA and MVBench tasks write (their `doc_to_text` with the default post prompts)
DOCVQA_POST_PROMPT = "\nAnswer the question using a single word or phrase."
MVBENCH_POST_PROMPT = "Only give the best option.\n"
# MVBench's official prompt (InternVL2's and PVC's evaluate_mvbench.py), written out for the preset check
MVBENCH_OFFICIAL = (
    "Carefully watch the video and pay attention to the cause and sequence of events, the detail and movement of "
    "objects, and the action and pose of persons. Based on your observations, select the best option that "
    "accurately addresses the question.\n\nQuestion: {question}\nOptions:\n{options}\nOnly give the best option."
)


def task_yaml(task: str, split: str, data: Path, benchmark: str, target: str) -> str:
    """The start of a task YAML: local parquet data, the benchmark's `doc_to_visual` / `doc_to_text` (from the
    folder's utils.py) and `GENERATION`."""
    generation = "".join(f"  {key}: {json.dumps(value)}\n" for key, value in GENERATION.items())
    return (
        textwrap.dedent(f"""\
            task: {task}
            dataset_path: parquet
            dataset_kwargs:
              data_files:
                {split}: {data}
            test_split: {split}
            output_type: generate_until
            doc_to_visual: !function utils.{benchmark}_doc_to_visual
            doc_to_text: !function utils.{benchmark}_doc_to_text
            doc_to_target: {target}
            generation_kwargs:
            """)
        + generation
    )


def write_tasks(folder: Path, docvqa_answers=None) -> dict:
    """The two tasks (YAML, utils.py, parquet data, mp4 files) in `folder`; their records by task name.
    `docvqa_answers(index, picture, truth)` gives a DocVQA record's reference answers (default: the truth)."""
    import av
    from datasets import Dataset, Features, Sequence, Value
    from datasets import Image as ImageFeature

    from pvc.experiments.toy_task import IMAGE_QUESTION, VIDEO_QUESTION, ToyConfig, grid_image, repaint_video

    toy, rng = ToyConfig(), np.random.default_rng(0)
    videos = folder / "videos"
    videos.mkdir(parents=True)
    pictures, docvqa = [], []
    for index in range(RECORDS):
        picture, truth = grid_image(toy, rng)
        pictures.append(Image.fromarray(picture))
        docvqa.append(
            dict(
                questionId=str(1000 + index),
                question=IMAGE_QUESTION,
                question_types=["figure/diagram"],
                docId=index,
                answers=docvqa_answers(index, pictures[-1], truth) if docvqa_answers else [truth],
                data_split="val",
            )
        )
    features = Features(
        questionId=Value("string"),
        question=Value("string"),
        question_types=Sequence(Value("string")),
        docId=Value("int64"),
        answers=Sequence(Value("string")),
        data_split=Value("string"),
        image=ImageFeature(),
    )
    Dataset.from_list([{**record, "image": picture} for record, picture in zip(docvqa, pictures)], features).to_parquet(
        folder / "docvqa.parquet"
    )
    mvbench = []
    for index in range(RECORDS):
        frames, truth = repaint_video(toy, 4 + index, rng)  # 4, 5, 6 frames
        name = f"clip{index}.mp4"
        with av.open(str(videos / name), "w") as container:
            stream = container.add_stream("mpeg4", rate=4)
            stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
            stream.codec_context.bit_rate = 4_000_000
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
        candidates = [truth, truth[::-1], "r" * 64]
        mvbench.append(dict(video=name, question=VIDEO_QUESTION, candidates=candidates, answer=truth))
    Dataset.from_list(mvbench).to_parquet(folder / "mvbench.parquet")

    (folder / "pvc_check_docvqa.yaml").write_text(
        task_yaml("pvc_check_docvqa", "validation", folder / "docvqa.parquet", "docvqa", "answers")
        + textwrap.dedent(f"""\
            lmms_eval_specific_kwargs:
              default:
                pre_prompt: ""
                post_prompt: {json.dumps(DOCVQA_POST_PROMPT)}
            metric_list:
              - metric: anls
                aggregation: mean
                higher_is_better: true
            """)
    )
    (folder / "pvc_check_mvbench.yaml").write_text(
        task_yaml("pvc_check_mvbench", "train", folder / "mvbench.parquet", "mvbench", "answer")
        + textwrap.dedent(f"""\
            lmms_eval_specific_kwargs:
              default:
                sub_task: action_sequence
                post_prompt: {json.dumps(MVBENCH_POST_PROMPT)}
            process_results: !function utils.mvbench_process_results
            metric_list:
              - metric: mvbench_accuracy
                aggregation: !function utils.mvbench_aggregate_results
                higher_is_better: true
            """)
    )
    (folder / "utils.py").write_text(
        textwrap.dedent(f"""\
            # lmms-eval's own DocVQA and MVBench prompts and scorers; only the videos' folder is this check's.
            import os

            from lmms_eval.tasks.docvqa.utils import docvqa_doc_to_text, docvqa_doc_to_visual  # noqa: F401
            from lmms_eval.tasks.mvbench.utils import (  # noqa: F401
                mvbench_aggregate_results,
                mvbench_doc_to_text,
                mvbench_process_results,
            )


            def mvbench_doc_to_visual(doc, lmms_eval_specific_kwargs=None):
                return [os.path.join({str(videos)!r}, doc["video"])]
            """)
    )
    return {
        "pvc_check_docvqa": [dict(record, image=picture) for record, picture in zip(docvqa, pictures)],
        "pvc_check_mvbench": [dict(record, video=str(videos / record["video"])) for record in mvbench],
    }


def run_lmms_eval(folder: Path, out: Path, model_args: str, tasks=("pvc_check_docvqa", "pvc_check_mvbench"), **flags):
    """lmms-eval on the local tasks, offline, with `--verbosity DEBUG` (without it lmms-eval exits 0 when the
    evaluation fails). The completed process."""
    command = [sys.executable, "-m", "lmms_eval", "--model", "pvc", "--model_args", model_args]
    command += ["--tasks", ",".join(tasks), "--include_path", str(folder), "--output_path", str(out)]
    command += ["--log_samples", "--verbosity", "DEBUG"]
    for flag, value in flags.items():
        command += [f"--{flag}", str(value)]
    environment = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(folder / "hf"))
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=900)


def logged(out: Path) -> dict:
    """The logged answers, by task and document id, and the scores: ({task: {doc_id: answer}}, {task: metrics})."""
    answers = {}
    for path in out.rglob("*_samples_*.jsonl"):
        task = path.stem.split("_samples_", 1)[1]
        answers[task] = {}
        for line in path.read_text().splitlines():
            sample = json.loads(line)
            answer = sample["filtered_resps"]
            answers[task][sample["doc_id"]] = answer[0] if isinstance(answer, list) else answer
    (results,) = list(out.rglob("*_results.json"))
    return answers, json.loads(results.read_text())["results"]


# ------------------------------------------------------------------------------------------------- direct path


@pytest.fixture(scope="module")
def demo():
    """The demo model and processor as a user loads them (remote code), in float32."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(DEMO, trust_remote_code=True, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(DEMO, trust_remote_code=True)


def direct_answer(demo, media: dict, text: str, num_beams: int = 1, **options) -> str:
    """What `apply_chat_template` + `generate` answer for one visual and a prompt (`options`: the processor's)."""
    model, processor = demo
    conversation = [{"role": "user", "content": [media, {"type": "text", "text": text}]}]
    inputs = processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", **options
    )
    with torch.no_grad():
        output = model.generate(
            **inputs, max_new_tokens=GENERATION["max_new_tokens"], do_sample=False, num_beams=num_beams
        )
    return processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]


def docvqa_text(record) -> str:
    return record["question"] + DOCVQA_POST_PROMPT


def mvbench_text(record) -> str:
    options = "".join(f"({letter}) {option}\n" for letter, option in zip("ABCDE", record["candidates"]))
    return "Question:" + record["question"] + "\nOption:\n" + options + MVBENCH_POST_PROMPT


def expected_answers(demo, records) -> dict:
    return {
        "pvc_check_docvqa": [
            direct_answer(demo, {"type": "image", "image": r["image"]}, docvqa_text(r))
            for r in records["pvc_check_docvqa"]
        ],
        "pvc_check_mvbench": [
            direct_answer(demo, {"type": "video", "video": r["video"]}, mvbench_text(r))
            for r in records["pvc_check_mvbench"]
        ],
    }


def anls(prediction: str, answers: list[str], threshold: float = 0.5) -> float:
    """DocVQA's ANLS of one prediction, written out here (the oracle for lmms-eval's score): 1 - normalised edit
    distance to the nearest answer (lower-cased, stripped), 0 below the threshold."""

    def distance(a: str, b: str) -> int:
        row = list(range(len(b) + 1))
        for i, x in enumerate(a, 1):
            previous, row[0] = row[0], i
            for j, y in enumerate(b, 1):
                previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (x != y))
        return row[-1]

    best = 0.0
    for answer in answers:
        a, b = answer.strip().lower(), prediction.strip().lower()
        similarity = 1 - distance(a, b) / max(len(a), len(b), 1)
        best = max(best, similarity if similarity >= threshold else 0.0)
    return best


# ------------------------------------------------------------------------------------------------------ checks


@pytest.fixture(scope="module")
def tasks(tmp_path_factory, demo):
    """The tasks, DocVQA's reference answers made so that ANLS is 1, partial and about 0 for its three records: the
    direct answer, that answer with a quarter of its characters changed, and the truth (the toy model rarely says
    it whole). The answers come from the direct path, not from lmms-eval."""
    from pvc.experiments.toy_task import IMAGE_QUESTION

    def answers(index, picture, truth):
        said = direct_answer(demo, {"type": "image", "image": picture}, IMAGE_QUESTION + DOCVQA_POST_PROMPT)
        changed = "".join("x" if position % 4 == 0 else c for position, c in enumerate(said))
        return [[said], [changed], [truth]][index]

    folder = tmp_path_factory.mktemp("tasks")
    return folder, write_tasks(folder, answers)


@pytest.fixture(scope="module")
def expected(demo, tasks):
    return expected_answers(demo, tasks[1])


@pytest.mark.parametrize("batch_size", [1, 2])
def test_logged_answers_equal_direct_generate(tasks, expected, tmp_path, batch_size):
    folder, records = tasks
    result = run_lmms_eval(
        folder, tmp_path / "out", f"pretrained={DEMO},dtype=float32", batch_size=batch_size, device="cpu"
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    answers, scores = logged(tmp_path / "out")
    for task, wanted in expected.items():
        assert [answers[task][index] for index in range(RECORDS)] == wanted, task
    # scored by lmms-eval's own metric code: DocVQA's ANLS against the one written out here; MVBench's accuracy
    wanted_anls = np.mean(
        [anls(a, r["answers"]) for a, r in zip(expected["pvc_check_docvqa"], records["pvc_check_docvqa"])]
    )
    assert scores["pvc_check_docvqa"]["anls,none"] == pytest.approx(wanted_anls)
    assert 0 <= scores["pvc_check_mvbench"]["mvbench_accuracy,none"] <= 100


def test_mvbench_preset_frames_prompt_and_beams(tasks, demo, tmp_path):
    """preset=mvbench: the official prompt, 5 beams, and its 96 frames (here overridden by num_frames=6, as a
    user's option wins over the preset)."""
    folder, records = tasks
    result = run_lmms_eval(
        folder,
        tmp_path / "out",
        f"pretrained={DEMO},dtype=float32,preset=mvbench,num_frames=6",
        tasks=("pvc_check_mvbench",),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    answers, _ = logged(tmp_path / "out")
    for index, record in enumerate(records["pvc_check_mvbench"]):
        options = "\n".join(f"({letter}) {option}" for letter, option in zip("ABCDE", record["candidates"]))
        text = MVBENCH_OFFICIAL.format(question=record["question"], options=options)
        media = {"type": "video", "video": record["video"]}
        assert answers["pvc_check_mvbench"][index] == direct_answer(demo, media, text, num_beams=5, num_frames=6)


def test_a_missing_checkpoint_fails_loudly(tasks, tmp_path):
    folder, _ = tasks
    result = run_lmms_eval(folder, tmp_path / "out", f"pretrained={tmp_path / 'nowhere'}", device="cpu")
    assert result.returncode != 0
    assert "no such folder" in result.stdout + result.stderr


def test_unknown_model_args_and_presets_are_named(tasks, tmp_path):
    folder, _ = tasks
    result = run_lmms_eval(folder, tmp_path / "out", f"pretrained={DEMO},num_frame=8", device="cpu")
    assert result.returncode != 0 and "num_frame" in result.stdout + result.stderr
    result = run_lmms_eval(folder, tmp_path / "out2", f"pretrained={DEMO},preset=mvbenchh", device="cpu")
    assert result.returncode != 0 and "Unknown preset 'mvbenchh'" in result.stdout + result.stderr


def test_a_missing_video_fails_loudly(tasks, tmp_path):
    folder, _ = tasks
    moved = folder / "videos" / "clip1.mp4"
    moved.rename(moved.with_suffix(".bak"))
    try:
        result = run_lmms_eval(folder, tmp_path / "out", f"pretrained={DEMO}", tasks=("pvc_check_mvbench",))
    finally:
        moved.with_suffix(".bak").rename(moved)
    assert result.returncode != 0
    assert "Video file not found" in result.stdout + result.stderr


def test_the_checkpoints_stop_tokens_end_the_answer(tasks, demo, tmp_path):
    """Generation stops where the checkpoint's generation config says, not at the tokenizer's EOS: a copy of the
    demo model whose config also stops at "y" answers up to its first "y", as its direct `generate` does."""
    import shutil

    folder, records = tasks
    checkpoint = tmp_path / "stops_at_y"
    shutil.copytree(DEMO, checkpoint, symlinks=False)
    config = json.loads((checkpoint / "generation_config.json").read_text())
    y = demo[1].tokenizer.convert_tokens_to_ids("y")
    (checkpoint / "generation_config.json").write_text(
        json.dumps({**config, "eos_token_id": [config["eos_token_id"], y]})
    )
    result = run_lmms_eval(folder, tmp_path / "out", f"pretrained={checkpoint}", tasks=("pvc_check_docvqa",))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    answers, _ = logged(tmp_path / "out")
    unstopped = [
        direct_answer(demo, {"type": "image", "image": r["image"]}, docvqa_text(r)) for r in records["pvc_check_docvqa"]
    ]
    # up to and with the first "y" (a plain token, so decoded; a real end-of-turn token is special and dropped)
    wanted = [a[: a.index("y") + 1] if "y" in a else a for a in unstopped]
    assert [answers["pvc_check_docvqa"][index] for index in range(RECORDS)] == wanted
    assert any("y" in answer for answer in unstopped)  # the copy's stop token made a difference


# ------------------------------------------------------------------------------------ the model, in this process


@pytest.fixture(scope="module")
def plugin():
    from pvc.evaluation.lmms_eval_model import PVCLmmsEval

    return PVCLmmsEval(pretrained=str(DEMO), dtype="float32", device="cpu", batch_size=2)


def requests_for(plugin, contents: list[list[dict]], options=None):
    """lmms-eval requests of a task whose records hold the given message contents."""
    from lmms_eval.api.instance import Instance

    plugin.task_dict = {"check": {"test": [{"content": content} for content in contents]}}
    options = dict(GENERATION if options is None else options)
    return [
        Instance(
            "generate_until",
            ("", lambda doc: [{"role": "user", "content": doc["content"]}], options, index, "check", "test"),
            0,
            metadata={"task": "check", "doc_id": index, "repeats": 1},
        )
        for index in range(len(contents))
    ]


def test_mixed_batches_of_images_and_videos(plugin, demo, tasks):
    """Batch size 2 over image, video, image, video, video: batches with both kinds, each answer the direct one."""
    _, records = tasks
    picture = [{"type": "image", "url": r["image"]} for r in records["pvc_check_docvqa"]]
    video = [{"type": "video", "url": r["video"]} for r in records["pvc_check_mvbench"]]
    items = [picture[0], video[0], picture[1], video[1], video[2]]
    texts = ["Colours of the cells?", "Colours at the end?", "Which colours?", "What is last?", "Colours at the end?"]
    answers = plugin.generate_until(
        requests_for(plugin, [[item, {"type": "text", "text": t}] for item, t in zip(items, texts)])
    )
    for item, text, answer in zip(items, texts, answers):
        media = {"type": item["type"], item["type"]: item["url"]}
        assert answer == direct_answer(demo, media, text)


def test_until_strings_cut_the_answer(plugin, demo, tasks):
    _, records = tasks
    content = [{"type": "image", "url": records["pvc_check_docvqa"][0]["image"]}, {"type": "text", "text": "Colours?"}]
    full = direct_answer(demo, {"type": "image", "image": content[0]["url"]}, "Colours?")
    stop = full[len(full) // 2]
    (answer,) = plugin.generate_until(requests_for(plugin, [content], {**GENERATION, "until": [stop]}))
    assert answer == full.split(stop, 1)[0] and len(answer) < len(full)


def test_a_time_window_of_a_video(plugin, demo, tasks):
    """A video with `video_start`/`video_end` gives the frames of that window, as the processor's own start/end
    options pick them."""
    _, records = tasks
    path = records["pvc_check_mvbench"][2]["video"]  # 6 frames at 4 per second
    content = [
        {"type": "video", "url": path, "start_time": 0.5, "end_time": 1.25},
        {"type": "text", "text": "Colours?"},
    ]
    (answer,) = plugin.generate_until(requests_for(plugin, [content]))
    assert answer == direct_answer(demo, {"type": "video", "video": path}, "Colours?", start=0.5, end=1.25)


def test_unsupported_requests_are_named(plugin):
    requests = requests_for(plugin, [[{"type": "audio", "url": "speech.wav"}, {"type": "text", "text": "Who speaks?"}]])
    with pytest.raises(ValueError, match="check sends audio input"):
        plugin.generate_until(requests)
    with pytest.raises(NotImplementedError, match="check asks for log-likelihoods"):
        plugin.loglikelihood(requests)


def test_a_checkpoint_that_is_not_pvc_is_named(tmp_path):
    from pvc.evaluation.lmms_eval_model import PVCLmmsEval

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "internvl_chat"}))
    with pytest.raises(ValueError, match="'internvl_chat' checkpoint, not PVC's; convert it first"):
        PVCLmmsEval(pretrained=str(tmp_path), device="cpu")


# ------------------------------------------------------------------------------------ the serving route


@pytest.mark.skipif(
    not os.environ.get("PVC_SERVE"),
    reason="needs pvc-serve from .venv-vllm (PVC_SERVE; scripts/test_lmms_eval.sh sets it)",
)
def test_openai_compatible_against_pvc_serve(tasks, tmp_path):
    """lmms-eval's `openai_compatible` model against `pvc-serve` with the README's flags: images (PNG data URLs)
    answered as direct `generate` answers them; videos sent as file:// paths (`pass_video_url=True`), read by the
    server under `--allowed-local-media-path`, answered. The model is scripts/vllm_check.py's small random PVC
    (vLLM's CPU attention takes its head size, not the demo model's)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    sys.path.insert(0, str(ROOT / "scripts"))
    from vllm_check import build
    from vllm_server_check import free_port, stop, wait_until_ready

    folder, records = tasks
    checkpoint = build(tmp_path)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, trust_remote_code=True, dtype=torch.float32).eval()
    served = (model, AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True))
    wanted = [
        direct_answer(served, {"type": "image", "image": r["image"]}, docvqa_text(r))
        for r in records["pvc_check_docvqa"]
    ]
    port = free_port()
    options = ["--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager"]
    options += ["--max-model-len", "2048", "--allowed-local-media-path", str(folder), "--trust-request-mm-kwargs"]
    environment = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", HF_HOME=str(tmp_path / "hf"))
    server = subprocess.Popen(
        [os.environ["PVC_SERVE"], str(checkpoint), *options],
        start_new_session=True,
        env=environment,
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_until_ready(server, f"http://127.0.0.1:{port}")
        command = [sys.executable, "-m", "lmms_eval", "--model", "openai_compatible", "--model_args"]
        command += [
            f"model_version={checkpoint},base_url=http://127.0.0.1:{port}/v1,api_key=unused,pass_video_url=True,max_frames_num=4"
        ]
        command += ["--tasks", "pvc_check_docvqa,pvc_check_mvbench", "--include_path", str(folder)]
        command += ["--output_path", str(tmp_path / "out"), "--log_samples", "--verbosity", "DEBUG"]
        offline = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(folder / "hf"))
        result = subprocess.run(command, capture_output=True, text=True, env=offline, timeout=900)
    finally:
        stop(server)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    answers, _ = logged(tmp_path / "out")
    # lmms-eval logs a request that failed as an answer (and exits 0): none may look like one
    failed = [a for answers_of_task in answers.values() for a in answers_of_task.values() if "REQUEST_FAILED" in a]
    assert not failed, failed
    assert [answers["pvc_check_docvqa"][index] for index in range(RECORDS)] == wanted
    assert all(answers["pvc_check_mvbench"][index] for index in range(RECORDS)), answers["pvc_check_mvbench"]
