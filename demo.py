"""PVC end to end: images and a video through the processor and `generate`.

    python -m pvc.demo                       # the trained toy PVC in demo_model/: a fresh picture and video
    python -m pvc.demo --eval 200 --seed 1   # score it on 200 fresh samples ("accuracy A on N samples")
    python -m pvc.demo --model PATH_OR_ID    # a real checkpoint (PVC or `pvc-convert` output)
    python -m pvc.demo --random              # a small random-weight PVC at 448px: the pipeline, answers are noise

The toy PVC (trained here from scratch, see demo_model/TRAINING.md) reads the 8x8 colour grid of a 32x32 picture,
and the grid of the last frame of a 4-frame video whose cells are repainted as it plays: the demo prints the
question, the model's answer and the true one. With --model or --random it prints the visual token budget of PVC
against InternVL2 for the same inputs, and timings.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .conversion.options import whole_number
from .visuals_pvc import IMAGE, VIDEO, visual_tokens

DEMO_MODEL = Path(__file__).resolve().parent / "demo_model"


def small_random_model(seed: int = 0):
    """PVC with the real 448px tiles (64 tokens per frame) but a narrow, shallow tower and language model."""
    from pvc import PVCConfig, PVCForConditionalGeneration, PVCImageProcessor, PVCProcessor

    from .experiments.toy_task import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    config = PVCConfig(
        vision_config=dict(
            hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, num_temporal_layers=2
        ),
        text_config=dict(
            model_type="qwen2",
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
            max_position_embeddings=8192,
            tie_word_embeddings=False,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_start_token_id=tokenizer.convert_tokens_to_ids("<img>"),
        image_end_token_id=tokenizer.convert_tokens_to_ids("</img>"),
    )
    torch.manual_seed(seed)
    model = PVCForConditionalGeneration(config)
    with torch.no_grad():  # make the zero-initialised temporal branches live, as after training
        for name, param in model.named_parameters():
            if "temporal_gate" in name or name.endswith("fc2.weight"):
                param.normal_(std=0.05)
    processor = PVCProcessor(
        PVCImageProcessor(max_tiles=6, num_frames=8),
        tokenizer,
        tokens_per_frame=config.tokens_per_frame,
        image_repeat=config.image_repeat,
    )
    return model.eval(), processor


def demo_image() -> Image.Image:
    """A 896x448 colour gradient with a few shapes: two tiles and a thumbnail."""
    y, x = np.mgrid[0:448, 0:896]
    array = np.stack([x * 255 // 895, y * 255 // 447, (x + y) % 256], axis=-1).astype(np.uint8)
    array[100:200, 150:300] = (255, 255, 255)
    array[250:400, 600:750] = (0, 0, 0)
    return Image.fromarray(array)


def demo_video(path: Path, num_frames: int = 48, fps: int = 12) -> Path:
    """An mp4 of a white square moving left to right over a dark background."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        for index in range(num_frames):
            array = np.full((240, 320, 3), 30, np.uint8)
            left = 10 + index * 5
            array[90:150, left : left + 60] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def load(model_id: str, dtype: torch.dtype):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_id, trust_remote_code=True, dtype=dtype)
    processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=True)
    return model.eval(), processor


def check_media(parser, args):
    """--image and --video name readable files, checked before the model loads; each problem is one line."""
    if (args.image or args.video) and not (args.model or args.random):
        parser.error("--image and --video are for --model or --random; the toy demo draws its own picture and video.")
    for option, path in (("--image", args.image), ("--video", args.video)):
        if path is None:
            continue
        if not Path(path).expanduser().exists():
            parser.error(f"{option} {path}: no such file.")
        if not Path(path).expanduser().is_file():
            parser.error(f"{option} {path} is not a file.")
    if args.image:
        try:
            with Image.open(Path(args.image).expanduser()) as image:
                image.verify()
        except Exception as error:  # PIL raises several kinds for a file that is not an image
            parser.error(f"--image {args.image} is not an image PIL can read ({error}).")


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="pvc-demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="a PVC checkpoint (local folder or Hub id); default: the trained toy PVC")
    parser.add_argument("--random", action="store_true", help="a small PVC with random weights, 448px tiles")
    parser.add_argument("--eval", type=int, metavar="N", help="score the toy PVC on N fresh samples")
    parser.add_argument("--seed", type=whole_number(0), default=0, help="seed of the toy demo's generated samples")
    parser.add_argument("--image", help="an image file (default: a generated gradient)")
    parser.add_argument("--video", help="a video file (default: a generated clip)")
    parser.add_argument(
        "--num-frames", type=whole_number(1), default=8, help="frames sampled from the video (default 8)"
    )
    parser.add_argument("--max-new-tokens", type=whole_number(1), default=16)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.model and args.random:
        parser.error("--model and --random each choose the model: pass one of them.")
    if args.eval is not None and (args.model or args.random):
        parser.error("--eval scores the toy tasks of the built-in trained model: leave out --model and --random.")
    if args.eval is not None and args.eval < 1:
        parser.error(f"--eval takes a positive number of samples, got {args.eval}.")
    check_media(parser, args)
    if not (args.model or args.random):
        return toy_demo(args)
    from .conversion.options import missing_folder_message

    if args.model and (missing := missing_folder_message(args.model)):
        parser.error(f"--model {missing}")

    started = time.perf_counter()
    if args.model:
        model, processor = load(args.model, getattr(torch, args.dtype))
        print(f"Model: {args.model}")
    else:
        model, processor = small_random_model()
        print("Model: a small PVC built here with RANDOM weights (448px tiles, 64 tokens per frame).")
        print("       Its answers are noise: it shows the pipeline. Leave out --random for the trained toy PVC.")
    model.to(args.device)
    print(f"Loaded in {time.perf_counter() - started:.1f} s on {args.device}\n")

    with tempfile.TemporaryDirectory() as folder:
        image = args.image or demo_image()
        video = args.video or str(demo_video(Path(folder) / "demo.mp4"))
        requests = [
            ("image", [{"type": "image", "image": image}, {"type": "text", "text": "Describe the image."}]),
            ("video", [{"type": "video", "path": video}, {"type": "text", "text": "What moves in this video?"}]),
        ]
        rows = []
        for kind, content in requests:
            started = time.perf_counter()
            try:
                inputs = processor.apply_chat_template(
                    [{"role": "user", "content": content}],
                    add_generation_prompt=True,
                    tokenize=True,
                    return_dict=True,
                    return_tensors="pt",
                    num_frames=args.num_frames,
                ).to(args.device)
            except (ValueError, OSError) as error:  # a video that cannot be decoded, say: one line, no traceback
                raise SystemExit(f"pvc-demo: error: --{kind}: {error}") from None
            preprocess = time.perf_counter() - started
            started = time.perf_counter()
            with torch.inference_mode():
                output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
            seconds = time.perf_counter() - started
            answer = processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
            # InternVL2 by PVC's counting rule: 1/4 of the patch tokens per frame (2x2 pixel shuffle), an image once
            per_frame = round(model.config.tokens_per_frame * 0.25 / model.config.downsample_ratio**2)
            if kind == "image":
                units = int(inputs["image_num_tiles"].sum())
                internvl2 = visual_tokens(per_frame, 1, IMAGE, tiles=units)
                shape = f"{units} tiles x {model.config.image_repeat} frames"
            else:
                units = int(inputs["video_num_frames"].sum())
                internvl2 = visual_tokens(per_frame, 1, VIDEO, tiles=1, frames=units)
                shape = f"{units} frames"
            rows.append((kind, shape, visual, internvl2, preprocess, seconds))
            print(f"[{kind}] {answer!r}")

    print("\n| input | visual input | PVC tokens | InternVL2 tokens | preprocess s | generate s |")
    print("|---|---|---|---|---|---|")
    for kind, shape, visual, internvl2, preprocess, seconds in rows:
        print(f"| {kind} | {shape} | {visual} | {internvl2} | {preprocess:.2f} | {seconds:.2f} |")
    print(
        "\nAn image costs PVC as many tokens as InternVL2 (4 frames x 64 = 256 per tile) while a video frame costs 64"
        " instead of 256."
    )


def toy_demo(args):
    from .experiments.toy_task import DEMO_FRAMES, IMAGE_QUESTION, VIDEO_QUESTION, ToyConfig, grid_image, repaint_video

    model, processor = load(str(DEMO_MODEL), torch.float32)
    model.to(args.device)
    toy, rng = ToyConfig(), np.random.default_rng(args.seed)
    if args.eval is None:
        print(f"Model: the toy PVC in {DEMO_MODEL} (trained from scratch: see TRAINING.md there)\n")
        for kind, (media, truth) in (("image", grid_image(toy, rng)), ("video", repaint_video(toy, DEMO_FRAMES, rng))):
            question = IMAGE_QUESTION if kind == "image" else VIDEO_QUESTION
            what = "a 32x32 picture" if kind == "image" else f"a video of {DEMO_FRAMES} frames of 32x32"
            (answer,) = toy_answers(model, processor, [(kind, media)])
            right = sum(a == t for a, t in zip(answer, truth))
            print(f"[{kind}] {what}; question: {question!r}")
            print("model's answer and the true one, as the grid (r g b y = red green blue yellow):")
            for model_row, true_row in zip(as_grid(answer, toy.grid), as_grid(truth, toy.grid)):
                print(f"    {model_row}    {true_row}")
            print(f"{right} of {len(truth)} cells right\n")
        return
    scores = toy_scores(model, processor, args.eval, args.seed)
    for kind, values in scores.items():
        if values:
            print(f"{kind}: {np.mean(values):.3f} of the cells right on {len(values)} samples")
    print(f"accuracy {np.mean(scores['image'] + scores['video']):.3f} on {args.eval} samples")


def toy_scores(model, processor, samples: int, seed: int, batch_size: int = 16) -> dict:
    """Share of cells right per fresh sample, images and videos in turn, answered through `generate`."""
    from .experiments.toy_task import DEMO_FRAMES, ToyConfig, grid_image, repaint_video

    toy, rng = ToyConfig(), np.random.default_rng(seed)
    items = []
    for index in range(samples):
        media, truth = grid_image(toy, rng) if index % 2 == 0 else repaint_video(toy, DEMO_FRAMES, rng)
        items.append(("image" if index % 2 == 0 else "video", media, truth))
    scores = {"image": [], "video": []}
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        answers = toy_answers(model, processor, [(kind, media) for kind, media, _ in batch])
        for (kind, _, truth), answer in zip(batch, answers):
            scores[kind].append(sum(a == t for a, t in zip(answer, truth)) / len(truth))
    return scores


def toy_answers(model, processor, items) -> list[str]:
    """Greedy answers of the toy PVC to (kind, picture or frames) items, through the chat template and `generate`."""
    from .experiments.toy_task import DEMO_FRAMES, IMAGE_QUESTION, VIDEO_QUESTION

    conversations = [
        [
            {
                "role": "user",
                "content": [
                    {"type": kind, kind: media},
                    {"type": "text", "text": IMAGE_QUESTION if kind == "image" else VIDEO_QUESTION},
                ],
            }
        ]
        for kind, media in items
    ]
    inputs = processor.apply_chat_template(
        conversations,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        num_frames=DEMO_FRAMES,
    ).to(model.device)
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=70, do_sample=False)
    return processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def as_grid(answer: str, side: int) -> list[str]:
    """An answer in Z order (the toy task's readout) as rows of the grid; '?' where the answer is short."""
    from .experiments.toy_task import z_order

    cells = [["?"] * side for _ in range(side)]
    for (row, column), colour in zip(z_order(side), answer):
        cells[row][column] = colour
    return [" ".join(row) for row in cells]


if __name__ == "__main__":
    if not __package__:  # run as a file: its imports are the package's
        raise SystemExit("Run the demo as `bash scripts/demo.sh` or, with this repo installed, `python -m pvc.demo`.")
    main()
