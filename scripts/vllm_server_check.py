"""`pvc-serve` end to end: run by scripts/test_vllm.sh in .venv-vllm, after scripts/vllm_check.py built the model.

    python scripts/vllm_server_check.py MODEL_DIR

Starts the OpenAI-compatible server with `pvc-serve` on 127.0.0.1, then sends two chat requests with the `openai`
client: an image (a PNG data URL), whose greedy answer must equal `generate`'s on the same conversation, and a
video (an MP4 data URL, decoded by vLLM), whose prompt must hold as many tokens as the processor makes of a video
that size. Stops the server and exits non-zero on a difference.
"""

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
from PIL import Image

NEW_TOKENS = 6


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_ready(server, url: str, seconds: float = 600):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with status {server.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5):
                return
        except OSError:
            time.sleep(2)
    raise RuntimeError(f"the server was not ready after {seconds:.0f} s")


def stop(server):
    """End a server started in its own session, and what it started."""
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)


def png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def mp4_data_url(frames: np.ndarray, fps: int = 10) -> str:
    import cv2  # vLLM's own video reader; it comes with vLLM

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "clip.mp4")
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, frames.shape[2:0:-1])
        for frame in frames:
            writer.write(frame[..., ::-1])  # OpenCV writes BGR
        writer.release()
        return "data:video/mp4;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def generate_answer(model_dir: str, messages) -> str:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, trust_remote_code=True, dtype=torch.float32)
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def main(model_dir: str) -> int:
    from openai import OpenAI
    from transformers import AutoProcessor

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    options = ["--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager"]
    options += ["--max-model-len", "2048", "--limit-mm-per-prompt", '{"image": 2, "video": 1}']
    serve = str(Path(sys.executable).with_name("pvc-serve"))  # the console script of this environment
    server = subprocess.Popen([serve, model_dir, *options], start_new_session=True)
    ok = True
    try:
        wait_until_ready(server, url)
        client = OpenAI(base_url=url + "/v1", api_key="unused")
        rng = np.random.RandomState(7)
        image = Image.fromarray(rng.randint(0, 255, (56, 140, 3), dtype=np.uint8))
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": png_data_url(image)}},
                    {"type": "text", "text": "What is it?"},
                ],
            }
        ]
        reply = client.chat.completions.create(
            model=model_dir,
            messages=messages,
            temperature=0.0,
            max_tokens=NEW_TOKENS,
            extra_body={"min_tokens": NEW_TOKENS},
        )
        expected = generate_answer(model_dir, messages)
        same = reply.choices[0].message.content == expected
        ok &= same
        print(
            f"{'ok  ' if same else 'FAIL'} image over HTTP: {reply.choices[0].message.content!r} (generate {expected!r})"
        )

        frames = rng.randint(0, 255, (12, 48, 64, 3), dtype=np.uint8)
        video = [{"type": "video_url", "video_url": {"url": mp4_data_url(frames)}}, {"type": "text", "text": "And?"}]
        reply = client.chat.completions.create(
            model=model_dir, messages=[{"role": "user", "content": video}], temperature=0.0, max_tokens=NEW_TOKENS
        )
        processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
        text_only = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "And?"}]}]
        prompt = processor.apply_chat_template(text_only, add_generation_prompt=True)
        expected_tokens = len(processor(text=prompt, videos=[frames])["input_ids"][0])
        same = reply.usage.prompt_tokens == expected_tokens and bool(reply.choices[0].message.content)
        ok &= same
        print(
            f"{'ok  ' if same else 'FAIL'} video over HTTP: {reply.usage.prompt_tokens} prompt tokens (processor "
            f"{expected_tokens}), answer {reply.choices[0].message.content!r}"
        )
    finally:
        stop(server)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
