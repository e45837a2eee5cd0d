"""Run by test_training.py under `accelerate launch`: pvc-finetune, then each rank writes a hash of its weights.

ddp_finetune.py HASH_PREFIX [pvc-finetune arguments]
"""

import hashlib
import os
import sys

from pvc.training.finetune import parse_args, train

model = train(parse_args(sys.argv[2:]))
digest = hashlib.sha256()
for name, tensor in sorted(model.state_dict().items()):
    digest.update(name.encode() + tensor.detach().cpu().float().numpy().tobytes())
with open(f"{sys.argv[1]}.{os.environ.get('RANK', '0')}", "w") as handle:
    handle.write(digest.hexdigest())
