"""Fine-tune PVC with a plain `Trainer` (what `pvc-finetune` does, in a page).

    python examples/finetune.py --model ./PVC-InternVL2-8B --data train.jsonl --media-root ./media --output-dir out

The data is the common conversation format (see pvc/training/data.py). PVCTrainer only adds the optimizer
groups that give PVC's new modules a 10x learning rate; a plain `Trainer` works too, at one learning rate.
"""

import argparse

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, TrainingArguments

from pvc import PVCDataCollator
from pvc.training.data import ConversationDataset
from pvc.training.trainer import PVCTrainer

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True)
parser.add_argument("--data", required=True)
parser.add_argument("--media-root", default=None)
parser.add_argument("--output-dir", required=True)
args = parser.parse_args()

# float32 weights (the optimizer's master copy); bf16 comes from autocast on a GPU (TrainingArguments' bf16)
model = AutoModelForImageTextToText.from_pretrained(args.model, trust_remote_code=True, dtype=torch.float32)
processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)

trainer = PVCTrainer(
    model=model,
    args=TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=8,
        learning_rate=1e-5,
        num_train_epochs=1,
        bf16=torch.cuda.is_available(),  # bf16 mixed precision on a GPU; float32 on a CPU-only machine
        logging_steps=10,
        remove_unused_columns=False,  # the dataset yields raw records; the collator builds the inputs
        report_to="none",
    ),
    train_dataset=ConversationDataset(args.data, media_root=args.media_root),  # records checked up front
    data_collator=PVCDataCollator(processor, media_root=args.media_root, max_num_frames=16, max_tiles=6),
    processing_class=processor,  # saved with every checkpoint
    new_module_lr_multiplier=10.0,
)
trainer.train()
trainer.save_model(args.output_dir)
processor.save_pretrained(args.output_dir)
