"""Stream the answer token by token with `TextIteratorStreamer`.

python examples/streaming.py --model ./PVC-InternVL2-8B --image photo.jpg
"""

import argparse
from threading import Thread

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, TextIteratorStreamer

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True)
parser.add_argument("--image", required=True)
parser.add_argument("--question", default="Describe the image in detail.")
args = parser.parse_args()

dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
model = AutoModelForImageTextToText.from_pretrained(args.model, trust_remote_code=True, dtype=dtype, device_map="auto")
processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
messages = [
    {"role": "user", "content": [{"type": "image", "path": args.image}, {"type": "text", "text": args.question}]}
]
inputs = processor.apply_chat_template(
    messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
).to(model.device)

streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
Thread(target=model.generate, kwargs=dict(**inputs, streamer=streamer, max_new_tokens=256)).start()
for piece in streamer:
    print(piece, end="", flush=True)
print()
