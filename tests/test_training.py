"""Fine-tuning: the collator's labels, Trainer, the learning-rate multiplier, freezing, LoRA, DDP, the demo."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import IMAGE_TOKEN, tiny_model, tiny_processor, write_video
from PIL import Image
from safetensors import SafetensorError
from transformers import AutoModelForImageTextToText, TrainingArguments

from pvc import PVCDataCollator
from pvc.training.data import ConversationDataset, DataError
from pvc.training.trainer import PVCTrainer, add_lora, checkpointing_arguments, freeze, parameter_groups

REPO = Path(__file__).resolve().parents[1]
# The modules PVC adds to InternVL2 in the tiny PVC config (3 ViT layers, the last 2 progressive), listed by hand as
# the oracle for the learning-rate, freezing and LoRA tests (not `is_pvc_parameter`, the code under test).
NEW_MODULES = (
    "model.vision_tower.encoder.layer.1.temporal_",
    "model.vision_tower.encoder.layer.2.temporal_",
    "model.vision_tower.temporal_embedding.",
    "model.multi_modal_projector.temporal_embedding.",
    "model.multi_modal_projector.adaln.",
)


def is_new(name):
    return name.startswith(NEW_MODULES)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Two images and two short videos on disk, and records that mention them."""
    folder = tmp_path_factory.mktemp("media")
    rng = np.random.RandomState(0)
    for index in range(2):
        Image.fromarray(rng.randint(0, 255, (50, 70, 3), dtype=np.uint8)).save(folder / f"image{index}.png")
        np.save(folder / f"video{index}.npy", rng.randint(0, 255, (5, 30, 30, 3), dtype=np.uint8))
    records = [
        {
            "image": "image0.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is this?"},
                {"from": "gpt", "value": "red square"},
            ],
        },
        {
            "image": "image1.png",
            "conversations": [{"from": "human", "value": "Name it."}, {"from": "gpt", "value": "blue circle"}],
        },
        {
            "video": "video0.npy",
            "conversations": [{"from": "human", "value": "<video>\nWhat moves?"}, {"from": "gpt", "value": "a dog"}],
        },
        {
            "video": "video1.npy",
            "conversations": [{"from": "human", "value": "<video>\nAnd here?"}, {"from": "gpt", "value": "a cat"}],
        },
    ]
    for record in records:
        if "video" in record:  # arrays stand in for decoded videos
            record["video"] = np.load(folder / record["video"])
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r, default=lambda _: None) for r in records[:2]) + "\n")
    return folder, records


def saved_tiny_model(tmp_path):
    """A tiny PVC and its processor saved in tmp_path/model, as the commands and from_pretrained load them."""
    model_dir = tmp_path / "model"
    tiny_model("pvc").save_pretrained(model_dir)
    tiny_processor().save_pretrained(model_dir)
    return model_dir


def collator(folder, **options):
    return PVCDataCollator(tiny_processor(), media_root=folder, max_num_frames=3, **options)


def test_labels_cover_only_assistant_turns(media):
    folder, _ = media
    record = {
        "image": "image0.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"},
            {"from": "gpt", "value": "A cat."},
            {"from": "human", "value": "Sure?"},
            {"from": "gpt", "value": "Yes."},
        ],
    }
    data = collator(folder)
    batch = data([record])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    trained = labels != -100
    assert torch.equal(labels[trained], ids[trained])
    tokenizer = data.processor.tokenizer
    assert tokenizer.decode(ids[trained]) == "A cat.<|im_end|>Yes.<|im_end|>"
    # contiguous runs: exactly the two answers, each followed by its end-of-turn token
    edges = torch.cat([torch.tensor([0]), trained.int(), torch.tensor([0])]).diff()
    starts, ends = torch.nonzero(edges == 1).flatten(), torch.nonzero(edges == -1).flatten()
    assert len(starts) == 2
    for start, end in zip(starts.tolist(), ends.tolist()):
        assert tokenizer.decode(ids[end - 1 : end]) == "<|im_end|>"
        assert tokenizer.decode(ids[:start]).endswith("<|im_start|>assistant\n")
    assert not trained[ids == IMAGE_TOKEN].any()
    assert int((ids == IMAGE_TOKEN).sum()) == 4 * 4 * int(batch["image_num_tiles"].sum())


def test_collator_batches_mixed_media_with_padding(media):
    folder, records = media
    batch = collator(folder)([records[0], records[2]])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    shorter = int(batch["attention_mask"].sum(1).argmin())
    assert batch["attention_mask"][shorter, -1] == 0 and batch["labels"][shorter, -1] == -100  # right padding
    assert batch["visual_order"].tolist() == [0, 1]
    assert batch["video_num_frames"].tolist() == [3]
    model = tiny_model("pvc")
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)
    # a placeholder-less record gets one at the start of its first human turn
    assert "<image>\nName it." in collator(folder).render(collator(folder).messages(records[1], 1, 0))[0]


def test_too_long_samples_are_cut_only_after_the_visual_tokens(media):
    folder, records = media
    sample = collator(folder).encode(records[0])
    visual_end = max(i for i, token in enumerate(sample["input_ids"]) if token == IMAGE_TOKEN) + 1
    cut = collator(folder, max_length=visual_end + 3).encode(records[0])
    assert len(cut["input_ids"]) == visual_end + 3
    with pytest.raises(ValueError, match="max_length"):
        collator(folder, max_length=visual_end - 5).encode(records[0])


def test_bad_data_files_and_records_are_clear_errors(media, tmp_path):
    folder, records = media
    cases = {
        "broken.jsonl": ('{"conversations": []}\n\n{"conversations": [}\n', "line 3 is not valid JSON"),
        "object.json": ('{"conversations": []}', "expected a list of records, got a dict"),
        "no-turns.jsonl": ('{"image": "image0.png"}\n', "line 1 has no 'conversations' list"),
        "no-turns.json": ('[{"image": "image0.png"}]', "record 1 has no 'conversations' list"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=re.escape(message)):
            ConversationDataset(tmp_path / name)
    with pytest.raises(ValueError, match="Training data not found"):
        ConversationDataset(tmp_path / "missing.jsonl")
    url = "https://example.com/clip.mp4"  # URLs are not joined to media_root; relative paths are
    assert collator(folder)._path(url) == url and collator(folder)._path("a.png") == str(folder / "a.png")
    gpt_only = {"image": "image0.png", "conversations": [{"from": "gpt", "value": "a cat"}]}
    with pytest.raises(ValueError, match="no human turn"):
        collator(folder).encode(gpt_only)


def training_arguments(output, steps, **extra):
    return TrainingArguments(
        output_dir=str(output),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        logging_steps=5,
        save_steps=steps,
        report_to="none",
        remove_unused_columns=False,
        seed=0,
        use_cpu=True,
        **extra,
    )


def batch_loss(model, batch):
    model.eval()
    with torch.no_grad():
        loss = model(**batch).loss.item()
    model.train()
    return loss


def test_trainer_memorises_and_its_checkpoint_reloads(media, tmp_path):
    folder, records = media
    model = tiny_model("pvc", randomize=False, seed=1)
    data = collator(folder)
    batch = data(records)
    before = batch_loss(model, batch)
    trainer = PVCTrainer(
        model=model,
        args=training_arguments(tmp_path, 40),
        train_dataset=ConversationDataset(records),
        data_collator=data,
    )
    trainer.train()
    after = batch_loss(model, batch)
    assert after <= before / 2, (before, after)
    checkpoint = tmp_path / "checkpoint-40"
    assert (checkpoint / "modeling_pvc.py").exists()
    reloaded = AutoModelForImageTextToText.from_pretrained(checkpoint, trust_remote_code=True, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(**batch).logits, model.eval()(**batch).logits, rtol=0, atol=0)


def test_new_modules_get_the_learning_rate_multiplier(media, tmp_path):
    folder, records = media
    model = tiny_model("pvc")
    trainer = PVCTrainer(
        model=model,
        args=training_arguments(tmp_path, 1),
        train_dataset=ConversationDataset(records),
        data_collator=collator(folder),
        new_module_lr_multiplier=10,
    )
    optimizer = trainer.create_optimizer()
    rates = {id(param): group["lr"] for group in optimizer.param_groups for param in group["params"]}
    names = dict(model.named_parameters())
    assert len(rates) == len(names)
    for name, param in names.items():
        assert rates[id(param)] == pytest.approx(3e-3 * (10 if is_new(name) else 1)), name
    assert rates[id(names["model.vision_tower.encoder.layer.2.temporal_gate.weight"])] == pytest.approx(3e-2)
    groups = parameter_groups(model, 1.0, 10.0, 0.1)
    assert all(group["weight_decay"] == 0.0 for group in groups if group["name"].endswith("no_decay"))


def test_frozen_parts_get_no_gradient(media):
    folder, records = media
    model = tiny_model("pvc").train()
    freeze(model, vision=True, language_model=True)
    model(**collator(folder)(records)).loss.backward()
    for name, param in model.named_parameters():
        vit_base = name.startswith("model.vision_tower.") and not is_new(name)
        frozen = vit_base or name.startswith(("model.language_model.", "lm_head."))
        assert (param.grad is None) == frozen, name
        assert param.requires_grad != frozen, name


def test_lora_changes_only_adapters_and_merges_back(media, tmp_path):
    pytest.importorskip("peft")
    folder, records = media
    model = tiny_model("pvc")
    base = {name: param.detach().clone() for name, param in model.named_parameters()}
    peft_model = add_lora(model, rank=4, alpha=8, dropout=0.0)
    trainer = PVCTrainer(
        model=peft_model,
        args=training_arguments(tmp_path, 3),
        train_dataset=ConversationDataset(records),
        data_collator=collator(folder),
    )
    trainer.train()
    changed = set()
    for name, param in peft_model.named_parameters():
        original = name.replace("base_model.model.", "", 1).replace(".base_layer", "").replace(".original_module", "")
        if original in base and not torch.equal(param.detach(), base[original]):
            changed.add(name)
    trainable = {name for name, param in peft_model.named_parameters() if param.requires_grad}
    assert any("lora_" in name for name in trainable)
    assert changed <= trainable  # nothing outside adapters and modules_to_save moved
    assert not any(".language_model." in name and "lora_" not in name for name in trainable)
    batch = collator(folder)(records)
    with torch.no_grad():
        expected = peft_model.eval()(**batch).logits
        merged = peft_model.merge_and_unload()
        assert not any("lora_" in name for name, _ in merged.named_parameters())
        torch.testing.assert_close(merged(**batch).logits, expected, rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_argument_name():
    arguments = checkpointing_arguments(True)
    built = TrainingArguments(output_dir="unused", report_to="none", **arguments)
    name = next(key for key in arguments if not key.endswith("_kwargs"))
    assert getattr(built, name) is True and getattr(built, f"{name}_kwargs") == {"use_reentrant": False}
    assert not any(checkpointing_arguments(False)[key] for key in arguments)


def test_data_parallel_training_equals_one_process_on_the_combined_batch(media, tmp_path):
    """pvc-finetune on two CPU ranks (gloo, from accelerate's launcher) against a plain PyTorch loop here. The ranks
    collate different records that together cover the data once; in one step a rank whose batch is text-only
    (no visual input) meets a rank with media and neither hangs nor fails; both ranks end with the same weights,
    and those equal one process training on both ranks' records as one batch: the loss averaged over all label
    tokens of the step, clipped to norm 1, AdamW at a linearly decaying rate."""
    pytest.importorskip("accelerate")
    from safetensors.torch import load_file

    folder, records = media
    write_video(folder / "clip.mp4", 6)
    data = [
        records[0],  # an image
        {
            "image": "image1.png",
            "conversations": [{"from": "human", "value": "<image>\nAnd this?"}, *records[1]["conversations"][1:]],
        },
        {
            "video": "clip.mp4",
            "conversations": [
                {"from": "human", "value": "<video>\nWhere is the bar?"},
                {"from": "gpt", "value": "moving right"},
            ],
        },
        {"conversations": [{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "hello to you"}]},
    ]  # three with media and one text-only: whichever record it is paired with, that step mixes the two
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(record) for record in data) + "\n")
    model_dir = saved_tiny_model(tmp_path)
    steps, learning_rate, options = 2, 1e-2, ["--max-tiles", "2", "--num-frames", "3"]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--multi_gpu",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(Path(__file__).with_name("ddp_finetune.py")), str(tmp_path / "rank"),
        "--model", str(model_dir), "--data", str(tmp_path / "train.jsonl"), "--media-root", str(folder),
        "--output-dir", str(tmp_path / "out"), "--max-steps", str(steps), "--learning-rate", str(learning_rate),
        "--warmup", "0", "--new-module-lr-multiplier", "1", "--save-steps", "100", *options,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")  # two CPU ranks, also on a GPU machine
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True) as launch:  # fmt: skip
        try:
            output = launch.communicate(timeout=300)[0]  # it takes about 10 s
        except subprocess.TimeoutExpired:
            launch.terminate()  # the launcher stops the ranks (each runs in a session of its own)
            try:
                launch.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(launch.pid, signal.SIGKILL)
            pytest.fail("the two ranks hung (a collective that one rank never joined?)")
    assert launch.returncode == 0, output[-5000:]

    seen = [json.loads((tmp_path / f"rank.{rank}.json").read_text()) for rank in range(2)]
    answers = [record["conversations"][-1]["value"] for record in data]
    assert [len(batches) for batches in seen] == [steps, steps]
    assert sorted(answer for batches in seen for batch in batches for answer in batch) == sorted(answers)
    text_only = answers[-1]
    assert any((text_only in a) != (text_only in b) for a, b in zip(*seen))  # one rank text-only, the other media

    weights = [load_file(tmp_path / f"rank.{rank}.safetensors") for rank in range(2)]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    before = load_file(model_dir / "model.safetensors")
    moved = [name for name in weights[0] if not torch.equal(weights[0][name], before[name])]
    assert len(moved) > len(weights[0]) // 2 and any("temporal" in name for name in moved)  # it trained

    # The oracle: one process, each step's records of both ranks in one batch, no Trainer; its gradients (after
    # clipping) against those the ranks' optimizers stepped with.
    gradients = load_file(tmp_path / "rank.0.grads.safetensors")
    by_answer = dict(zip(answers, data))
    model = AutoModelForImageTextToText.from_pretrained(model_dir, trust_remote_code=True, dtype=torch.float32)
    model.train()
    collate = PVCDataCollator(tiny_processor(), media_root=folder, max_num_frames=3, max_tiles=2)
    parameters = dict(model.named_parameters())
    optimizer = torch.optim.AdamW(parameters.values(), lr=learning_rate, weight_decay=0.0)
    for step, batch in enumerate(zip(*seen)):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate * (1 - step / steps)
        model(**collate([by_answer[answer] for answers_of_rank in batch for answer in answers_of_rank])).loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters.values(), 1.0)
        assert {key for key in gradients if key.startswith(f"{step}.")} == {f"{step}.{name}" for name in parameters}
        for name, param in parameters.items():
            torch.testing.assert_close(
                gradients[f"{step}.{name}"], param.grad, rtol=1e-3, atol=1e-6, msg=lambda m: f"step {step}, {name}: {m}"
            )
        optimizer.step()
        optimizer.zero_grad()


def test_demo_runs_end_to_end(capsys):
    from pvc.demo import main

    main(["--random", "--max-new-tokens", "3", "--num-frames", "4"])
    out = capsys.readouterr().out
    assert "RANDOM weights" in out
    assert "| image | 3 tiles x 4 frames | 768 | 768 |" in out
    assert "| video | 4 frames | 256 | 1024 |" in out


def test_pipeline_on_images(tmp_path):
    from transformers import pipeline

    tiny_model("pvc").save_pretrained(tmp_path)
    tiny_processor().save_pretrained(tmp_path)
    pipe = pipeline("image-text-to-text", model=str(tmp_path), trust_remote_code=True)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": Image.new("RGB", (60, 40), "red")},
                {"type": "text", "text": "What?"},
            ],
        }
    ]
    out = pipe(text=messages, max_new_tokens=3)
    assert out[0]["generated_text"][-1]["role"] == "assistant"


def test_lora_respects_a_frozen_vision_tower():
    pytest.importorskip("peft")
    model = tiny_model("pvc")
    freeze(model, vision=True)
    peft_model = add_lora(model, rank=4, alpha=8, train_vision=False)
    trainable = [name for name, param in peft_model.named_parameters() if param.requires_grad]
    vision = [name for name in trainable if ".vision_tower." in name]
    plain = [name.replace("base_model.model.", "", 1).replace(".modules_to_save.default", "") for name in vision]
    assert plain and all(is_new(name) for name in plain)  # PVC's modules train, InternViT does not
    assert any("multi_modal_projector" in name for name in trainable)
    assert any("lora_" in name and "language_model" in name for name in trainable)


def test_examples_run_on_a_tiny_model(tmp_path):
    """The streaming and chat examples, end to end on a tiny saved model."""
    import av

    model_dir = saved_tiny_model(tmp_path)
    image = tmp_path / "image.png"
    Image.new("RGB", (80, 50), "green").save(image)
    video = tmp_path / "clip.mp4"
    with av.open(str(video), "w") as container:
        stream = container.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for index in range(6):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 40 * index, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for script, arguments in (
        ("streaming.py", ["--image", str(image)]),
        ("chat.py", ["--video", str(video), "--image", str(image), "--image", str(image)]),
    ):
        command = [sys.executable, str(REPO / "examples" / script), "--model", str(model_dir), *arguments]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]


def test_finetune_command_exits_zero_resumes_and_trains_bf16_on_cpu(media, tmp_path):
    folder, _ = media
    model_dir = saved_tiny_model(tmp_path)
    output = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def finetune(*extra):
        command = [sys.executable, "-m", "pvc.training.finetune", "--model", str(model_dir), "--data"]
        command += [str(folder / "train.jsonl"), "--media-root", str(folder), "--output-dir", str(output)]
        command += ["--save-steps", "1", "--max-tiles", "2", "--bf16", *extra]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)

    first = finetune("--max-steps", "2")
    assert first.returncode == 0, first.stderr[-3000:]  # was 1, with the whole model printed to stderr
    assert "PVCForConditionalGeneration(" not in first.stderr
    assert (output / "checkpoint-2").is_dir() and (output / "model.safetensors").exists()
    again = finetune("--max-steps", "3")  # would start at step 0 and overwrite the checkpoints
    assert again.returncode != 0 and "--resume" in again.stderr and not (output / "checkpoint-3").exists()
    resumed = finetune("--max-steps", "3", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    state = json.loads((output / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert f"Resuming from {output / 'checkpoint-2'}" in resumed.stderr


def test_frame_count_range_as_the_paper(media):
    """--num-frames 16-96: each record's video gets a count drawn from the range (all of it, nothing outside)."""
    from pvc.training.finetune import frame_count, parse_args

    assert frame_count("16") == 16 and frame_count("16-96") == (16, 96)
    with pytest.raises(SystemExit):
        parse_args(["--model", "m", "--data", "d", "--output-dir", "o", "--num-frames", "9-3"])
    assert parse_args(["--model", "m", "--data", "d", "--output-dir", "o", "--num-frames", "2-5"]).max_num_frames == (
        2,
        5,
    )
    folder, records = media
    torch.manual_seed(0)
    data = PVCDataCollator(tiny_processor(), media_root=folder, max_num_frames=(2, 5))
    counts = [int(data.encode(records[2])["video_num_frames"][0]) for _ in range(40)]
    assert set(counts) == {2, 3, 4, 5}


def test_bad_records_are_named_up_front_or_skipped(media, tmp_path):
    """Records that would fail mid-training are found as the file is read, named by file and number; with
    skip_bad they are left out and counted. Failures found only when the media are read (a cut through the visual
    tokens) name the record too, or drop it from its batch."""
    folder, _ = media
    good = {
        "image": "image0.png",
        "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}],
    }
    bad = [
        (
            {"image": "image0.png", "conversations": [{"from": "gpt", "value": "hi"}]},
            "the conversation does not start with a human turn",
        ),
        (
            {"conversations": [{"from": "human", "value": None}, {"from": "gpt", "value": "x"}]},
            "turn 1 has no text (its value is None)",
        ),
        (
            {"image": "nowhere.png", "conversations": good["conversations"]},
            f"its media file {folder / 'nowhere.png'} does not exist",
        ),
        ({"image": None, "conversations": good["conversations"]}, "its 'image' is null"),
        ({"conversations": [{"from": "human", "value": "hi"}]}, "the conversation has no assistant (gpt) turn"),
    ]
    for index, (record, message) in enumerate(bad):
        path = tmp_path / f"bad{index}.jsonl"
        path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
        with pytest.raises(ValueError, match=re.escape(f"{path}: line 2: {message}")):
            ConversationDataset(path, media_root=folder)
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [good] + [record for record, _ in bad] + [good]) + "\n")
    dataset = ConversationDataset(path, media_root=folder, skip_bad=True)
    assert len(dataset) == 2 and len(dataset.skipped) == len(bad)
    # found as the media are read: max_length too short for the image's 16 visual tokens
    strict = PVCDataCollator(tiny_processor(), media_root=folder, max_length=10)
    with pytest.raises(ValueError, match=re.escape(f"{path}: line 1:")):
        strict([dataset[0]])
    lenient = PVCDataCollator(tiny_processor(), media_root=folder, max_length=10, skip_bad=True)
    with pytest.raises(ValueError, match="Every record of a batch was bad"):
        lenient([dataset[0], dataset[1]])
    assert len(lenient.skipped) == 2


def test_records_are_checked_before_the_model_loads(media, tmp_path, capsys):
    """What needs no decoding is found as the file is read, each record named by its line (blank lines counted):
    more images than <image> placeholders, a placeholder in an assistant turn, a relative media file that is
    missing where it would be read (the working folder, without a media root)."""
    folder, _ = media
    question = {"from": "human", "value": "<image>\nWhat?"}
    cases = [
        (
            {"images": ["image0.png", "image1.png"], "conversations": [question, {"from": "gpt", "value": "x"}]},
            "it has 1 <image> placeholders but 2 images",
        ),
        (
            {"image": "image0.png", "conversations": [question, {"from": "gpt", "value": "<image> x"}]},
            "turn 2 (assistant) holds <image>; media go in human turns",
        ),
    ]
    for index, (record, message) in enumerate(cases):
        path = tmp_path / f"case{index}.jsonl"
        path.write_text("\n\n" + json.dumps(record) + "\n")
        with pytest.raises(DataError, match=re.escape(f"{path}: line 3: {message}")):
            ConversationDataset(path, media_root=folder)
    path = tmp_path / "relative.jsonl"
    path.write_text(json.dumps({"image": "image0.png", "conversations": [question, {"from": "gpt", "value": "x"}]}))
    assert len(ConversationDataset(path, media_root=folder)) == 1
    # pvc-finetune without --media-root reads relative paths from the working folder, and checks them there before
    # the model loads (the test runs outside the media folder; the model folder is empty and never read)
    from pvc.training.finetune import main

    code = main(["--model", str(tmp_path), "--data", str(path), "--output-dir", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert code == 1 and f"{path}: line 1: its media file image0.png does not exist (relative paths" in error


def test_a_batch_that_loses_every_record_takes_a_stand_in(media, tmp_path):
    """--skip-bad-records at batch size 1: a record whose media cannot be decoded is left out and the next usable
    record of the dataset fills the batch; it is counted once however often it comes round."""
    folder, _ = media
    (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video at all")
    conversation = [{"from": "human", "value": "<video>\nWhat?"}, {"from": "gpt", "value": "x"}]
    records = [{"video": "broken.mp4", "conversations": conversation, "_where": "line 1"}]
    records.append(
        {
            "image": "image0.png",
            "conversations": [{"from": "human", "value": "<image>\nA?"}, {"from": "gpt", "value": "y"}],
            "_where": "line 2",
        }
    )
    lenient = PVCDataCollator(tiny_processor(), media_root=folder, skip_bad=True, fallback=records)
    alone = PVCDataCollator(tiny_processor(), media_root=folder, max_tiles=2).encode(records[1])
    for _ in range(2):
        batch = lenient([records[0]])
        assert batch["input_ids"][0].tolist() == alone["input_ids"]
    assert len(lenient.skipped) == 1 and lenient.skipped[0].startswith("line 1:")
    with pytest.raises(DataError, match="no other record could stand in"):
        PVCDataCollator(tiny_processor(), media_root=folder, skip_bad=True, fallback=records[:1])([records[0]])


def test_finetune_data_errors_are_one_line(media, tmp_path, capsys):
    from pvc.training.finetune import main

    folder, _ = media
    data = tmp_path / "train.jsonl"
    data.write_text('{"conversations": [}\n')
    code = main(["--model", str(tmp_path), "--data", str(data), "--output-dir", str(tmp_path / "o")])
    error = capsys.readouterr().err
    assert code == 1 and error.startswith("pvc-finetune: error: ") and "line 1 is not valid JSON" in error
    assert "Traceback" not in error


def test_finetune_names_a_missing_model_folder(tmp_path, media):
    from pvc.training.finetune import main

    folder, _ = media
    argv = ["--model", "./PVC-typo", "--data", str(folder / "train.jsonl"), "--output-dir", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match=re.escape("--model ./PVC-typo: no such folder (a local path")):
        main(argv)


def test_the_demo_names_a_missing_model_folder(capsys):
    from pvc.demo import main

    with pytest.raises(SystemExit):
        main(["--model", "../PVC-typo"])
    assert "--model ../PVC-typo: no such folder (a local path" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["fp32", "--bf16"])
def test_small_updates_survive_and_checkpoints_hold_the_processor(media, tmp_path, mode):
    """At a fine-tuning rate (1e-5, 3 steps) most of the language model's weights move in float32 and under --bf16
    (mixed precision: float32 weights, bf16 autocast); the weights stay float32; every checkpoint-N loads with
    AutoProcessor."""
    from transformers import AutoProcessor

    from pvc.training.finetune import parse_args, train

    folder, _ = media
    model_dir = saved_tiny_model(tmp_path)
    before = AutoModelForImageTextToText.from_pretrained(model_dir, trust_remote_code=True, dtype=torch.float32)
    output = tmp_path / "out"
    argv = ["--model", str(model_dir), "--data", str(folder / "train.jsonl"), "--media-root", str(folder)]
    argv += ["--output-dir", str(output), "--max-steps", "3", "--save-steps", "3", "--learning-rate", "1e-5"]
    argv += ["--max-tiles", "2"] + ([mode] if mode != "fp32" else [])
    trained = train(parse_args(argv))
    weights = {name: param for name, param in trained.named_parameters() if ".language_model." in name}
    assert all(param.dtype == torch.float32 for param in weights.values())
    start = dict(before.named_parameters())
    moved = sum((param != start[name]).sum().item() for name, param in weights.items())
    total = sum(param.numel() for param in weights.values())
    assert moved / total > 0.5, f"only {moved / total:.1%} of the weights changed"
    processor = AutoProcessor.from_pretrained(output / "checkpoint-3", trust_remote_code=True)
    assert processor.chat_template and processor.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>") == IMAGE_TOKEN


def test_bf16_weights_are_asked_for_and_warned_about(media, tmp_path, caplog):
    from pvc.training.finetune import parse_args, train

    folder, _ = media
    model_dir = saved_tiny_model(tmp_path)
    argv = ["--model", str(model_dir), "--data", str(folder / "train.jsonl"), "--media-root", str(folder)]
    argv += ["--output-dir", str(tmp_path / "out"), "--max-steps", "1", "--save-steps", "5", "--bf16-weights"]
    trained = train(parse_args([*argv, "--max-tiles", "2"]))
    assert next(trained.parameters()).dtype == torch.bfloat16
    assert "rounds away" in caplog.text


@pytest.mark.parametrize("command", ["pvc.conversion.cli", "pvc.training.finetune"])
def test_help_loads_neither_torch_nor_transformers(command):
    """`--help` answers at once: the commands import torch, transformers and the model only once they run."""
    probe = (
        f"import sys\nfrom {command} import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(name for name in ('torch', 'transformers') if name in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout and result.stdout.strip().splitlines()[-1] == "[]", result.stdout[-500:]


def test_training_ids_equal_the_chat_templates(tmp_path):
    """The collator builds each sample through the processor: its input_ids equal what apply_chat_template gives
    for the same conversation (images, videos, several of each, and a record cut at max_length), and its labels are
    the assistant's tokens, as the processor's assistant mask marks them."""
    import numpy as np
    from conftest import tiny_processor
    from PIL import Image

    from pvc import PVCDataCollator

    processor = tiny_processor()
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (56, 56 * k, 3), dtype=np.uint8)) for k in (1, 2)]
    clips = [rng.integers(0, 256, (6, 28, 28, 3), dtype=np.uint8) for _ in range(2)]
    cases = [
        ({"image": pictures[0]}, [pictures[0]], []),
        ({"video": clips[0]}, [], [clips[0]]),
        ({"images": pictures, "videos": clips}, pictures, clips),
    ]
    for media, images, videos in cases:
        record = dict(media, conversations=[{"from": "human", "value": "What?"}, {"from": "gpt", "value": "This."}])
        sample = PVCDataCollator(processor, max_num_frames=3).encode(record)
        content = [{"type": "image", "image": image} for image in images]
        content += [{"type": "video", "video": video} for video in videos] + [{"type": "text", "text": "What?"}]
        chat = [{"role": "user", "content": content}, {"role": "assistant", "content": "This."}]
        expected = processor.apply_chat_template(
            chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, num_frames=3
        )
        assert sample["input_ids"] == expected["input_ids"][0]
        trained = [token for token, label in zip(sample["input_ids"], sample["labels"]) if label != -100]
        marked = [token for token, keep in zip(expected["input_ids"][0], expected["assistant_masks"][0]) if keep]
        assert trained == marked and processor.tokenizer.decode(trained) == "This.<|im_end|>"
    # a record cut at max_length (its visual tokens all before the cut) is the chat template's ids, cut
    record = dict(
        image=pictures[0], conversations=[{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A" * 40}]
    )
    chat = [
        {"role": "user", "content": [{"type": "image", "image": pictures[0]}, {"type": "text", "text": "Q"}]},
        {"role": "assistant", "content": "A" * 40},
    ]
    full = processor.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"][0]
    cut = PVCDataCollator(processor, max_length=len(full) - 20).encode(record)  # through the answer
    assert (
        cut["input_ids"] == full[:-20]
        and processor.tokenizer.decode(
            [token for token, label in zip(cut["input_ids"], cut["labels"]) if label != -100]
        )
        == "A" * 21
    )


def finetune_argv(media, model_dir, output, *extra):
    folder, _ = media
    argv = ["--model", str(model_dir), "--data", str(folder / "train.jsonl"), "--media-root", str(folder)]
    return argv + ["--output-dir", str(output), "--max-tiles", "2", "--save-steps", "1", *extra]


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--max-tiles", "0", "expected a whole number of at least 1, got '0'"),
        ("--gradient-accumulation-steps", "0", "expected a whole number of at least 1, got '0'"),
        ("--learning-rate", "-1e-5", "expected a finite number above 0, got '-1e-5'"),
        ("--learning-rate", "0", "expected a finite number above 0, got '0'"),
        ("--learning-rate", "nan", "expected a finite number above 0, got 'nan'"),
        ("--new-module-lr-multiplier", "0", "expected a finite number above 0, got '0'"),
        ("--batch-size", "0", "expected a whole number of at least 1, got '0'"),
        ("--epochs", "0", "expected a finite number above 0, got '0'"),
        ("--max-steps", "0", "expected a whole number of at least 1, got '0'"),
        ("--weight-decay", "-0.1", "expected a finite number of at least 0, got '-0.1'"),
        (
            "--warmup",
            "2.5",
            "expected a fraction of all steps below 1 (e.g. 0.03) or a whole number of steps, got '2.5'",
        ),
        ("--warmup", "-0.1", "expected a finite number of at least 0, got '-0.1'"),
        ("--logging-steps", "0", "expected a whole number of at least 1, got '0'"),
        ("--save-steps", "1.5", "expected a whole number of at least 1, got '1.5'"),
        ("--seed", "-1", "expected a whole number from 0 to 4294967295, got '-1'"),
        ("--lora-rank", "0", "expected a whole number of at least 1, got '0'"),
        ("--lora-alpha", "0", "expected a whole number of at least 1, got '0'"),
        ("--max-length", "0", "expected a whole number of at least 1, got '0'"),
        ("--output-dir", "", "expected a path, got ''"),
        ("--media-root", "", "expected a path, got ''"),
    ],
)
def test_finetune_options_are_checked_before_anything_loads(media, tmp_path, capsys, option, value, message):
    """Each numeric option (and an empty path) stops the command with one line naming it, before the model loads:
    the model folder here is empty, so anything that got as far as loading it would fail otherwise."""
    from pvc.training.finetune import main

    (tmp_path / "model").mkdir()
    argv = finetune_argv(media, tmp_path / "model", tmp_path / "out") + [f"{option}={value}"]
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"pvc-finetune: error: argument {option}: {message}"
    assert not (tmp_path / "out").exists()


def test_the_collator_refuses_a_tile_or_frame_count_below_one():
    """max_tiles=0 was dropped as if not given (the processor's 12 tiles); None still means the processor's."""
    for options in (dict(max_tiles=0), dict(max_tiles=1.5), dict(max_num_frames=0), dict(max_num_frames=(3, 2))):
        with pytest.raises(ValueError, match=f"{next(iter(options))} must be"):
            PVCDataCollator(tiny_processor(), **options)
    PVCDataCollator(tiny_processor(), max_tiles=None, max_num_frames=(2, 5), max_length=None)


def test_resume_takes_the_last_complete_checkpoint_and_names_those_it_skips(tmp_path, caplog):
    """A checkpoint is complete when its trainer_state.json (written last) parses and its weights are there."""
    from pvc.training.finetune import parse_args, resume_checkpoint

    output = tmp_path / "out"

    def checkpoint(step, state='{"global_step": 1}', weights="model.safetensors"):
        folder = output / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        if weights:
            (folder / weights).write_bytes(b"weights")
        if state is not None:
            (folder / "trainer_state.json").write_text(state)
        return folder

    def resume(*extra):
        return resume_checkpoint(parse_args(["--model", "m", "--data", "d", "--output-dir", str(output), *extra]))

    checkpoint(1, state=None)  # killed while its weights were written
    with pytest.raises(SystemExit, match=r"holds no complete checkpoint \(checkpoint-1: saves cut short\)"):
        resume("--resume")
    checkpoint(2, weights="adapter_model.safetensors")  # LoRA's checkpoints hold the adapters
    checkpoint(10, state='{"global_step": 1')  # killed while trainer_state.json was written
    checkpoint(9, weights=None)
    checkpoint(11, state=None)  # killed after its weights, before trainer_state.json
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert resume("--resume") == str(output / "checkpoint-2")
    for step, reason in (
        (11, "no trainer_state.json"),
        (10, "trainer_state.json is cut short"),
        (9, "no model weights"),
    ):
        assert f"skipping {output / f'checkpoint-{step}'}, a save cut short (" in caplog.text and reason in caplog.text
    assert "checkpoint-1," not in caplog.text  # not looked at: checkpoint-2 was complete
    with pytest.raises(SystemExit, match=r"checkpoint-11 is a save cut short \(no trainer_state.json"):
        resume("--resume", str(output / "checkpoint-11"))
    assert resume("--resume", str(output / "checkpoint-2")) == str(output / "checkpoint-2")
    with pytest.raises(SystemExit, match="already holds checkpoints"):
        resume()


def test_resume_after_a_kill_while_a_checkpoint_was_saved(media, tmp_path):
    """SIGKILL while checkpoint-2's weights are written (half of model.safetensors, no trainer_state.json): --resume
    goes on from checkpoint-1, says it skipped checkpoint-2, and writes checkpoint-2 whole."""
    model_dir = saved_tiny_model(tmp_path)
    output = tmp_path / "out"
    killed_in_the_save = (
        "import os, signal, sys\n"
        "from pvc.training.trainer import PVCTrainer\n"
        "save_model = PVCTrainer.save_model\n"
        "def killed_at_step_2(self, output_dir=None, _internal_call=False):\n"
        "    save_model(self, output_dir, _internal_call)\n"
        "    if self.state.global_step == 2:\n"
        "        weights = os.path.join(output_dir, 'model.safetensors')\n"
        "        os.truncate(weights, os.path.getsize(weights) // 2)\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "PVCTrainer.save_model = killed_at_step_2\n"
        "from pvc.training.finetune import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    argv = finetune_argv(media, model_dir, output, "--max-steps", "3")
    killed = subprocess.run(
        [sys.executable, "-c", killed_in_the_save, *argv], env=env, capture_output=True, text=True, timeout=600
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (output / "checkpoint-2" / "trainer_state.json").exists()
    command = [sys.executable, "-m", "pvc.training.finetune", *argv, "--resume"]
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"--resume: skipping {output / 'checkpoint-2'}, a save cut short (no trainer_state.json" in resumed.stderr
    assert f"Resuming from {output / 'checkpoint-1'}" in resumed.stderr
    for step in (2, 3):
        assert json.loads((output / f"checkpoint-{step}" / "trainer_state.json").read_text())["global_step"] == step
    assert (output / "model.safetensors").exists()


def one_line_error(capsys) -> str:
    """The command's error line: its only line that is not a progress bar or a log record, and no traceback."""
    error = capsys.readouterr().err
    lines = [line for line in error.splitlines() if line.startswith("pvc-finetune: ")]
    assert len(lines) == 1 and "Traceback" not in error, error[-3000:]
    return lines[0]


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_last_complete_checkpoint(media, tmp_path, capsys):
    """A full disk while checkpoint-2 is saved (torch.save's error there, as measured on a full tmpfs), then while
    the final model is saved (safetensors'): one line each, saying what was kept and what to do; the half-written
    checkpoint is removed, none of the final model is left, and --resume then finishes the run."""
    import transformers.modeling_utils

    from pvc.training.finetune import main
    from pvc.training.trainer import incomplete_because

    model_dir = saved_tiny_model(tmp_path)
    output = tmp_path / "out"
    argv = finetune_argv(media, model_dir, output, "--max-steps", "2")
    torch_save, safe_save_file = torch.save, transformers.modeling_utils.safe_save_file

    def full_at_checkpoint_2(value, path, *args, **kwargs):
        if "checkpoint-2" in str(path):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return torch_save(value, path, *args, **kwargs)

    def full_outside_checkpoints(tensors, filename, *args, **kwargs):
        if "checkpoint-" not in str(filename):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return safe_save_file(tensors, filename, *args, **kwargs)

    def top_level():
        return sorted(path.name for path in output.iterdir())

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "save", full_at_checkpoint_2)
        assert main(argv) == 1
    assert one_line_error(capsys) == (
        f"pvc-finetune: error: Writing {output / 'checkpoint-2'} failed: torch.save could not write its file ([enforce "
        "fail at inline_container.cc:672] . unexpected pos 576 vs 534). The half-written checkpoint-2 was removed and "
        f"checkpoint-1 is the last complete one. Free space under {output}, then continue from it with --resume."
    )
    assert top_level() == ["checkpoint-1"] and incomplete_because(output / "checkpoint-1") is None

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(transformers.modeling_utils, "safe_save_file", full_outside_checkpoints)
        assert main([*argv, "--resume"]) == 1
    assert one_line_error(capsys) == (
        f"pvc-finetune: error: Writing the fine-tuned model into {output} failed and none of it was kept: No space "
        "left on device. Free space there, then continue from checkpoint-2 with --resume to save it."
    )
    assert top_level() == ["checkpoint-1", "checkpoint-2"] and incomplete_because(output / "checkpoint-2") is None

    assert main([*argv, "--resume"]) == 0
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(top_level())
    assert not [name for name in top_level() if name.startswith(".")]


def test_a_checkpoint_being_written_again_never_looks_complete_half_way(media, tmp_path):
    """Resumed from checkpoint-1 while a complete checkpoint-2 exists, the run writes checkpoint-2 again: cut short
    after the new weights (a crash here), it must not pass for complete with the old trainer_state.json."""
    from pvc.training.finetune import main
    from pvc.training.trainer import incomplete_because

    model_dir = saved_tiny_model(tmp_path)
    output = tmp_path / "out"
    argv = finetune_argv(media, model_dir, output, "--max-steps", "2")
    assert main(argv) == 0 and incomplete_because(output / "checkpoint-2") is None
    torch_save = torch.save

    def crash_at_checkpoint_2(value, path, *args, **kwargs):
        if "checkpoint-2" in str(path):
            raise ValueError("a crash while checkpoint-2 is written")
        return torch_save(value, path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "save", crash_at_checkpoint_2)
        with pytest.raises(ValueError, match="a crash while"):
            main([*argv, "--resume", str(output / "checkpoint-1")])
    assert incomplete_because(output / "checkpoint-2") == "no trainer_state.json, which Trainer writes last"


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--random", "--image", "{tmp}/none.png"], "--image {tmp}/none.png: no such file."),
        (["--random", "--video", "{tmp}/none.mp4"], "--video {tmp}/none.mp4: no such file."),
        (["--random", "--video", "{tmp}"], "--video {tmp} is not a file."),
        (["--random", "--image", "{tmp}/notes.txt"], "--image {tmp}/notes.txt is not an image PIL can read ("),
        (["--image", "{tmp}/notes.txt"], "--image and --video are for --model or --random; the toy demo draws its"),
        (["--random", "--num-frames", "0"], "argument --num-frames: expected a whole number of at least 1, got '0'"),
        (["--random", "--max-new-tokens", "0"], "argument --max-new-tokens: expected a whole number of at least 1"),
    ],
)
def test_the_demo_names_a_bad_file_or_option_in_one_line_before_loading(
    tmp_path, capsys, monkeypatch, arguments, message
):
    """A missing or unreadable --image/--video, or a count below one, is one line naming it (it was a traceback after
    the model had loaded); no model is built."""
    import pvc.demo

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(pvc.demo, "small_random_model", no_model)
    monkeypatch.setattr(pvc.demo, "load", no_model)
    (tmp_path / "notes.txt").write_text("not a picture")
    with pytest.raises(SystemExit) as stop:
        pvc.demo.main([argument.format(tmp=tmp_path) for argument in arguments])
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error and error.splitlines()[-1].startswith(
        f"pvc-demo: error: {message.format(tmp=tmp_path)}"
    )


def test_the_demo_reports_a_video_it_cannot_decode_in_one_line(tmp_path, capsys):
    from pvc.demo import main

    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video at all")
    with pytest.raises(SystemExit) as stop:
        main(["--random", "--max-new-tokens", "1", "--video", str(tmp_path / "broken.mp4")])
    assert str(stop.value.code).startswith("pvc-demo: error: --video: ") and str(tmp_path) in str(stop.value.code)
