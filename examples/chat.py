"""Multi-turn chat about a video, then a batch of image prompts (left padding), with a PVC checkpoint.

python examples/chat.py --model ./PVC-InternVL2-8B --video clip.mp4 --image a.jpg --image b.jpg
"""

import argparse

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True)
parser.add_argument("--video", required=True)
parser.add_argument("--image", action="append", required=True)
args = parser.parse_args()

dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
model = AutoModelForImageTextToText.from_pretrained(args.model, trust_remote_code=True, dtype=dtype, device_map="auto")
processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)


def reply(conversations, **options):
    inputs = processor.apply_chat_template(
        conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", **options
    ).to(model.device)
    output = model.generate(**inputs, max_new_tokens=128, do_sample=False)
    return processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


# Multi-turn: the whole history goes back in, the video each time (64 tokens per frame).
history = [
    {"role": "user", "content": [{"type": "video", "path": args.video}, {"type": "text", "text": "What happens?"}]}
]
answer = reply([history], num_frames=32)[0]
print("assistant:", answer)
history += [{"role": "assistant", "content": answer}, {"role": "user", "content": "What happens at the end?"}]
print("assistant:", reply([history], num_frames=32)[0])

# A batch of prompts: the processor pads on the left, ready for generate.
batch = [
    [{"role": "user", "content": [{"type": "image", "path": path}, {"type": "text", "text": "Caption this image."}]}]
    for path in args.image
]
for path, caption in zip(args.image, reply(batch)):
    print(f"{path}: {caption}")
