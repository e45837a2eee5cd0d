"""Train the demo's default model: a small PVC that reads the 8x8 colour grid of a picture, and of the last frame of a
video whose grid changes, on the tasks of `toy_ablation.py`.

    python -m pvc.experiments.demo_model --out demo_model

The committed `demo_model/` was made by exactly that command (its TRAINING.md records the command, the time and the
held-out accuracy). The folder is a normal checkpoint: `AutoModelForImageTextToText.from_pretrained("demo_model",
trust_remote_code=True)` and `AutoProcessor.from_pretrained(...)` load it; its code files are links to the
repository's own, so they never go stale.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..conversion.options import CODE_FILES
from ..conversion.writing import set_output_modes
from .toy_ablation import Task, build_model, build_processor, evaluate, train
from .toy_task import DEMO_FRAMES, ToyConfig, tiny_tokenizer


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder to write the model to (replaced)")
    parser.add_argument("--steps", type=int, default=6000, help="training steps, alternating image and video")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-samples", type=int, default=512)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    # initialised as when the committed demo model was made (before the ablation's paired initialisation)
    toy = replace(ToyConfig(), steps=args.steps, video_frames=(DEMO_FRAMES,), paired_init=False)
    tokenizer = tiny_tokenizer()
    model = build_model("pvc", toy, args.seed, tokenizer)
    processor = build_processor(model, toy, tokenizer)
    tasks = [Task("image", processor, toy), Task("video", processor, toy, num_frames=DEMO_FRAMES)]
    started = time.perf_counter()
    train(model, tasks, toy, args.seed, log_every=100, log=lambda line: print(line, flush=True))
    minutes = (time.perf_counter() - started) / 60
    scores = {task.kind: evaluate(model, task, args.eval_samples, args.seed) for task in tasks}
    print(f"held-out accuracy: {scores}")

    # Written beside the destination, then moved into place: an interrupted run leaves the old model as it was.
    args.out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{args.out.name}-", dir=args.out.parent))
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        for name in CODE_FILES:  # links to the repository's code instead of copies
            (staging / name).unlink(missing_ok=True)
            (staging / name).symlink_to(Path(os.path.relpath(Path(__file__).parents[1] / name, args.out.resolve())))
        set_output_modes(staging, args.out)  # the umask's permissions, not the temporary folder's private ones
        (staging / "TRAINING.md").write_text(
            "# How this model was made\n\n"
            f"    python -m pvc.experiments.demo_model {' '.join(argv)}\n\n"
            f"PVC (vision width {toy.vision_width}, {toy.vision_layers} layers of which {toy.temporal_layers} "
            f"progressive; Qwen2 text model of width {toy.text_width}, {toy.text_layers} layers), trained from scratch "
            f"for {args.steps} steps, alternating the image task and the video task ({DEMO_FRAMES} frames) of "
            f"`experiments/toy_ablation.py`, seed {args.seed}, torch {torch.__version__}, {minutes:.1f} minutes on one "
            f"CPU thread.\n\nHeld-out accuracy ({args.eval_samples} samples each, share of cells right): image "
            f"{scores['image']:.3f}, video {scores['video']:.3f} (chance 0.25).\n"
        )
        if args.out.exists():
            shutil.rmtree(args.out)
        staging.rename(args.out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
