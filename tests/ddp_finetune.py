"""Run by test_training.py under `accelerate launch`: pvc-finetune, recording what each rank trained on.

ddp_finetune.py PREFIX [pvc-finetune arguments]

Each rank writes PREFIX.RANK.json (the answers of the records in each batch it collated, in order),
PREFIX.RANK.grads.safetensors (the gradients the optimizer stepped with, as "STEP.NAME": after DDP's averaging and
Trainer's clipping) and PREFIX.RANK.safetensors (its weights after training).
"""

import json
import os
import sys

from safetensors.torch import save_file

from pvc.training.data import PVCDataCollator
from pvc.training.finetune import parse_args, train
from pvc.training.trainer import PVCTrainer

prefix, rank = sys.argv[1], os.environ.get("RANK", "0")
batches, gradients = [], {}
collate, create_optimizer = PVCDataCollator.__call__, PVCTrainer.create_optimizer


def recording_collate(self, records):
    batches.append([record["conversations"][-1]["value"] for record in records])
    return collate(self, records)


def recording_optimizer(self, model=None):
    optimizer = create_optimizer(self, model)
    names = {id(param): name.removeprefix("module.") for name, param in self.model.named_parameters()}
    steps = []

    def record(optimizer, args, kwargs):
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    gradients[f"{len(steps)}.{names[id(param)]}"] = param.grad.detach().clone()
        steps.append(None)

    optimizer.register_step_pre_hook(record)
    return optimizer


PVCDataCollator.__call__, PVCTrainer.create_optimizer = recording_collate, recording_optimizer
model = train(parse_args(sys.argv[2:]))
with open(f"{prefix}.{rank}.json", "w") as handle:
    json.dump(batches, handle)
save_file(gradients, f"{prefix}.{rank}.grads.safetensors")
state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
state.pop("lm_head.weight", None)  # tied to the embeddings
save_file(state, f"{prefix}.{rank}.safetensors")
