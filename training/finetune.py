"""`pvc-finetune`: fine-tune PVC with the Hugging Face `Trainer` on a conversation dataset.

    pvc-finetune --model ./PVC-InternVL2-8B --data train.jsonl --media-root ./media --output-dir ./out \\
        --bf16 --gradient-checkpointing --learning-rate 1e-5

As the paper, all parameters train, and the modules PVC adds (progressive layers' temporal parts, temporal
embeddings, projector AdaLN) with a 10x learning rate (`--new-module-lr-multiplier`). Parts can be frozen, or the
language model (and the ViT) trained through LoRA adapters, merged back into the saved model at the end.
Multi-GPU: `accelerate launch -m pvc.training.finetune ...` (DDP; FSDP and DeepSpeed configs in examples/).
"""

import argparse
import logging
import os
import re
import shutil
import sys
import tempfile

from ..conversion.options import nonempty_path, real_number, whole_number

# torch, transformers and the model are imported when the command runs, not for `--help`.

logger = logging.getLogger(__name__)


def frame_count(text: str):
    """`16` -> 16; `16-96` -> (16, 96)."""
    found = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", text)
    low, high = (int(found.group(1)), int(found.group(2) or found.group(1))) if found else (0, 0)
    if low < 1 or high < low:
        raise argparse.ArgumentTypeError(f"expected a frame count such as 16 or a range such as 16-96, got {text!r}")
    return low if low == high else (low, high)


def warmup_amount(text: str) -> float:
    """`--warmup`: a fraction of all steps below 1, a whole number of steps from 1 on (Trainer would cut 2.5 to 2)."""
    value = real_number(0)(text)
    if value >= 1 and not value.is_integer():
        raise argparse.ArgumentTypeError(
            f"expected a fraction of all steps below 1 (e.g. 0.03) or a whole number of steps, got {text!r}"
        )
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="pvc-finetune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # Every numeric option is checked here, before anything loads: a bad value stops the command with one line naming
    # the option (a batch size of 0 used to fail with a traceback after the model had loaded, --epochs 0 to report a
    # saved "fine-tuned" model, --max-tiles 0 to be ignored).
    parser.add_argument("--model", required=True, type=nonempty_path, help="a PVC checkpoint (folder or Hub id)")
    parser.add_argument("--data", required=True, type=nonempty_path, help="training records, .json or .jsonl")
    parser.add_argument(
        "--media-root", type=nonempty_path, default=None, help="folder that media paths are relative to"
    )
    parser.add_argument("--output-dir", required=True, type=nonempty_path)
    parser.add_argument("--learning-rate", type=real_number(0, above=True), default=1e-5)
    parser.add_argument(
        "--new-module-lr-multiplier",
        type=real_number(0, above=True),
        default=10.0,
        help="learning-rate factor for PVC's new modules (default 10, as the paper)",
    )
    parser.add_argument("--weight-decay", type=real_number(0), default=0.0)
    parser.add_argument("--epochs", type=real_number(0, above=True), default=1.0)
    parser.add_argument(
        "--max-steps", type=whole_number(1), default=-1, help="optimizer steps; overrides --epochs (default: by epochs)"
    )
    parser.add_argument("--batch-size", type=whole_number(1), default=1, help="per device")
    parser.add_argument("--gradient-accumulation-steps", type=whole_number(1), default=1)
    parser.add_argument(
        "--warmup", type=warmup_amount, default=0.03, help="warmup steps, or a fraction of all steps if < 1"
    )
    parser.add_argument("--logging-steps", type=whole_number(1), default=10)
    parser.add_argument("--save-steps", type=whole_number(1), default=500)
    parser.add_argument("--seed", type=whole_number(0, 2**32 - 1), default=42)
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="bf16 mixed precision, as Trainer's --bf16: float32 weights and optimizer, the forward in bf16 autocast",
    )
    parser.add_argument(
        "--bf16-weights",
        action="store_true",
        help="keep the weights themselves in bf16 (half the weight memory); with no float32 master copy, updates "
        "smaller than about 1/256 of a weight round away, so most weights stop moving at fine-tuning rates",
    )
    parser.add_argument("--gradient-checkpointing", action="store_true", help="non-reentrant activation checkpointing")
    parser.add_argument("--freeze-vision", action="store_true", help="freeze InternViT (PVC's modules still train)")
    parser.add_argument("--freeze-projector", action="store_true")
    parser.add_argument("--freeze-llm", action="store_true")
    parser.add_argument("--lora", action="store_true", help="LoRA on the language model instead of full training")
    parser.add_argument("--lora-vision", action="store_true", help="also LoRA on the ViT's linear layers")
    parser.add_argument("--lora-rank", type=whole_number(1), default=16)
    parser.add_argument("--lora-alpha", type=whole_number(1), default=32)
    parser.add_argument(
        "--max-num-frames",
        "--num-frames",
        type=frame_count,
        default=None,
        help="frames per video, or a range drawn from per record, e.g. 16-96 as the paper (default: processor's)",
    )
    parser.add_argument(
        "--max-tiles", type=whole_number(1), default=None, help="tiles per image (default: processor's)"
    )
    parser.add_argument("--max-length", type=whole_number(1), default=None, help="token cap per sample")
    parser.add_argument("--report-to", default="none")
    parser.add_argument(
        "--skip-bad-records",
        action="store_true",
        help="leave out records that cannot be used (they are counted at the end) instead of stopping at the first",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="last",
        default=None,
        metavar="CHECKPOINT",
        help="continue an interrupted run: from the last complete checkpoint in --output-dir, or from the one named",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """`pvc-finetune`: train as the arguments say; 0 on success, 1 with one line naming the problem when the data
    cannot be used or a checkpoint or the model cannot be written (a full disk)."""
    args = parse_args(argv)
    from .data import DataError
    from .trainer import WriteError

    try:
        train(args)
    except (DataError, WriteError) as error:
        print(f"pvc-finetune: error: {error}", file=sys.stderr)
        return 1
    return 0


def resume_checkpoint(args) -> str | None:
    """The checkpoint to resume from: `--resume PATH`, or with a bare `--resume` the last complete one in
    `--output-dir` (`trainer.incomplete_because` says what complete means): a later one that a kill cut short while
    it was being saved is skipped, and named in a log line. Without `--resume`, an output folder that already holds
    checkpoints is an error rather than overwritten."""
    from .trainer import checkpoint_folders, incomplete_because

    found = checkpoint_folders(args.output_dir)
    if args.resume is None:
        if found:
            raise SystemExit(
                f"pvc-finetune: error: {args.output_dir} already holds checkpoints ({os.path.basename(found[-1])}): "
                "pass --resume to continue from the last one, or choose another --output-dir."
            )
        return None
    if args.resume == "last":
        if not found:
            raise SystemExit(f"pvc-finetune: error: --resume: {args.output_dir} holds no checkpoint-* folder.")
        skipped = []
        for folder in reversed(found):
            reason = incomplete_because(folder)
            if reason is None:
                return folder
            logger.warning("--resume: skipping %s, a save cut short (%s)", folder, reason)
            skipped.append(os.path.basename(folder))
        raise SystemExit(
            f"pvc-finetune: error: --resume: {args.output_dir} holds no complete checkpoint ({', '.join(skipped)}: "
            "saves cut short). Remove them to start afresh, or choose another --output-dir."
        )
    if not os.path.isdir(args.resume):
        raise SystemExit(f"pvc-finetune: error: --resume: no checkpoint folder at {args.resume}.")
    reason = incomplete_because(args.resume)
    if reason is not None:
        raise SystemExit(
            f"pvc-finetune: error: --resume: {args.resume} is a save cut short ({reason}); pass an earlier "
            "checkpoint, or --resume alone for the last complete one."
        )
    return args.resume


def save_model(model, processor, output_dir: str):
    """The fine-tuned model and its processor into `output_dir`, written into a folder beside them first and moved in
    file by file: a write that fails (a full disk) leaves none of it, says so in one line (`WriteError`), and the
    checkpoints stay as they were."""
    from ..conversion.writing import write_failure
    from .trainer import WriteError, last_complete_checkpoint

    staging = tempfile.mkdtemp(prefix=".model.partial-", dir=output_dir)
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        for name in sorted(os.listdir(staging)):
            os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
    except Exception as error:
        reason = write_failure(error)
        if reason is None:
            raise
        last = last_complete_checkpoint(output_dir)
        then = f"continue from {os.path.basename(last)} with --resume to save it" if last else "run again"
        raise WriteError(
            f"Writing the fine-tuned model into {output_dir} failed and none of it was kept: {reason}. Free space "
            f"there, then {then}."
        ) from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def train(args):
    """Train as the arguments (of `parse_args`) say; returns the trained (and, with LoRA, merged) model."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainingArguments

    from ..conversion.options import missing_folder_message
    from .data import ConversationDataset, PVCDataCollator
    from .trainer import PVCTrainer, add_lora, checkpointing_arguments, freeze

    logging.basicConfig(level=logging.INFO)
    missing = missing_folder_message(args.model)
    if missing:
        raise SystemExit(f"pvc-finetune: error: --model {missing}")
    resume = resume_checkpoint(args)
    # read and checked first: a bad data file fails before minutes of model loading
    # without --media-root, relative media paths are read from the working folder: checked there
    media_root = args.media_root if args.media_root is not None else os.curdir
    dataset = ConversationDataset(args.data, media_root, skip_bad=args.skip_bad_records)
    # --bf16 is mixed precision (float32 weights, bf16 autocast); only --bf16-weights stores the weights in bf16
    dtype = torch.bfloat16 if args.bf16_weights else torch.float32
    if args.bf16_weights:
        logger.warning(
            "--bf16-weights: the weights are trained in bf16 without a float32 copy; an update smaller than about "
            "1/256 of its weight rounds away (at 1e-5, most of them). Use --bf16 for mixed precision instead."
        )
    model = AutoModelForImageTextToText.from_pretrained(args.model, trust_remote_code=True, dtype=dtype)
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    freeze(model, args.freeze_vision, args.freeze_projector, args.freeze_llm)
    if args.lora:
        model = add_lora(
            model,
            args.lora_rank,
            args.lora_alpha,
            vision=args.lora_vision,
            train_vision=not args.freeze_vision,
            train_projector=not args.freeze_projector,
        )
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        warmup_steps=args.warmup,
        logging_steps=args.logging_steps,
        save_steps=args.save_steps,
        seed=args.seed,
        bf16=args.bf16 or args.bf16_weights,
        use_cpu=not torch.cuda.is_available(),  # bf16 then trains on the CPU too (transformers asks for this flag)
        **checkpointing_arguments(args.gradient_checkpointing),
        remove_unused_columns=False,  # records hold media paths and conversations, not model inputs
        report_to=args.report_to,
        ddp_find_unused_parameters=False,
    )
    collator = PVCDataCollator(
        processor,
        args.media_root,
        args.max_num_frames,
        args.max_tiles,
        args.max_length,
        skip_bad=args.skip_bad_records,
        fallback=dataset,  # a batch that lost every record takes the next usable one
    )
    trainer = PVCTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=processor,  # saved in every checkpoint-N, so that each loads with AutoProcessor
        new_module_lr_multiplier=args.new_module_lr_multiplier,
    )
    if resume:
        logger.info("Resuming from %s", resume)
    trainer.train(resume_from_checkpoint=resume)
    if args.lora:
        model = trainer.model.merge_and_unload()
    else:
        model = trainer.model
    skipped = dataset.skipped + collator.skipped
    if skipped:
        logger.warning("Left out %d bad records (--skip-bad-records): %s", len(skipped), "; ".join(skipped[:5]))
    if trainer.is_world_process_zero():
        save_model(model, processor, args.output_dir)
        logger.info("Saved the fine-tuned model to %s", args.output_dir)
    return model


if __name__ == "__main__":
    sys.exit(main())
