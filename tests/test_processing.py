"""The processor: tiling, frame sampling with PyAV, placeholder expansion, chat template, batches."""

import re
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from conftest import IMAGE_TOKEN, tiny_model, tiny_processor, write_video
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pvc import PVCImageProcessor, PVCVideoProcessor
from pvc.image_processing_pvc import tile_grid, to_pil, torchvision_loads

# The image processor's backends this environment has (the suite runs once without torchvision, once with it).
BACKENDS = ["pil", *(["torchvision"] if torchvision_loads() else [])]

# (width, height, max_tiles) -> (columns, rows), worked out by hand from InternVL's rule: the grid with the
# closest aspect ratio; on a tie the larger grid wins when the image area exceeds half of the grid's area.
GRIDS = [
    ((448, 448, 12), (1, 1)),
    ((896, 448, 12), (2, 1)),
    ((448, 896, 12), (1, 2)),
    ((1344, 448, 12), (3, 1)),
    ((800, 600, 12), (4, 3)),  # exact 4:3 within 12 tiles
    ((800, 600, 6), (3, 2)),  # 1.5 is the closest ratio with at most 6 tiles
    ((1000, 1000, 12), (3, 3)),  # 1:1 ties: 1e6 px > half of 3x3 tiles (903168)
    ((500, 500, 12), (1, 1)),  # 250000 px < half of 2x2 tiles (401408): stays 1x1
    ((2000, 100, 12), (12, 1)),
    ((100, 2000, 5), (1, 5)),
    ((640, 480, 1), (1, 1)),
]


@pytest.mark.parametrize(("size", "grid"), GRIDS)
def test_tile_grid_follows_internvl_rule(size, grid):
    width, height, max_tiles = size
    assert tile_grid(width, height, 1, max_tiles, 448) == grid


@pytest.mark.parametrize(("size", "grid"), GRIDS)
def test_tiles_and_thumbnail(size, grid):
    width, height, max_tiles = size
    processor = PVCImageProcessor(image_size=28, max_tiles=max_tiles)  # same rule, 16x smaller tiles
    image = Image.new("RGB", (width // 16, height // 16))
    columns, rows = grid  # worked out by hand, not by the code under test
    out = processor(images=image)
    tiles = columns * rows
    assert out["image_num_tiles"].tolist() == [tiles + (1 if tiles > 1 else 0)]
    assert out["pixel_values"].shape == (tiles + (tiles > 1), 3, 28, 28)


def test_tiles_are_the_resized_image_row_by_row():
    processor = PVCImageProcessor(image_size=4, max_tiles=2, image_mean=(0, 0, 0), image_std=(1, 1, 1))
    left, right = np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 255, np.uint8)
    out = processor(images=np.concatenate([left, right], axis=1))  # 8x4: two tiles
    pixels = out["pixel_values"]
    assert pixels.shape == (3, 3, 4, 4)
    assert pixels[0].max() == 0 and pixels[1].min() == 1  # left tile, right tile, then the thumbnail
    assert 0 < pixels[2].mean() < 1


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK", "1", "I;16"])
def test_image_modes(mode):
    image = Image.fromarray(np.random.RandomState(0).randint(0, 255, (30, 40, 3), dtype=np.uint8)).convert(mode)
    out = PVCImageProcessor(image_size=28, image_mean=(0, 0, 0), image_std=(1, 1, 1))(images=image)
    pixels = out["pixel_values"]
    assert pixels.shape[1:] == (3, 28, 28) and torch.isfinite(pixels).all()
    if mode in ("L", "1"):
        assert torch.equal(pixels[:, 0], pixels[:, 1]) and torch.equal(pixels[:, 1], pixels[:, 2])


def test_image_input_types(tmp_path):
    array = np.random.RandomState(0).randint(0, 255, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "image.png")
    processor = PVCImageProcessor(image_size=28)
    reference = processor(images=Image.fromarray(array))["pixel_values"]
    for variant in (
        array,
        array.astype(np.float32) / 255,
        torch.from_numpy(array).permute(2, 0, 1),  # CHW uint8
        str(tmp_path / "image.png"),
        tmp_path / "image.png",
    ):
        torch.testing.assert_close(processor(images=variant)["pixel_values"], reference)
    # a flat or nested list: one entry per image; 40x30 is exactly 4:3, so 12 tiles + thumbnail each
    assert processor(images=[array, [array, array]])["image_num_tiles"].tolist() == [13, 13, 13]


def test_pixel_arrays_read_as_transformers_reads_them():
    """Signed integers (numpy's default int) are 0..255 and floats 0..1, as uint8 images and videos; values outside
    those ranges are an error that says so, never a near-white picture."""
    array = np.random.RandomState(2).randint(0, 256, (30, 40, 3), dtype=np.uint8)
    processor = PVCImageProcessor(image_size=28, max_tiles=1)
    reference = processor(images=Image.fromarray(array))["pixel_values"]
    for variant in (
        array.astype(int),
        array.astype(np.int16),
        torch.from_numpy(array.astype(np.int64)),
        torch.from_numpy(array).float() / 255,
    ):
        torch.testing.assert_close(processor(images=variant)["pixel_values"], reference)
    frames = np.stack([array, array[::-1]])
    videos = PVCVideoProcessor(image_size=28)
    torch.testing.assert_close(
        videos(videos=[frames.astype(int)])["pixel_values_videos"], videos(videos=[frames])["pixel_values_videos"]
    )
    with pytest.raises(ValueError, match=re.escape("float pixels must lie in 0..1 (divide 0..255 values by 255")):
        processor(images=torch.from_numpy(array).float())  # read_image(...).float()
    with pytest.raises(ValueError, match=re.escape("holds values in [-3, 247]; integer pixels must lie in 0..255")):
        processor(images=np.minimum(array.astype(int), 250) - 3)  # uint8 minus an offset, wrapped in int
    with pytest.raises(ValueError, match="float pixels must lie in 0..1"):
        videos(videos=[frames.astype(np.float32)])


def test_image_files_are_read_upright(tmp_path):
    """A camera photo stored sideways with an EXIF orientation tag is processed as a viewer shows it."""
    stored = Image.fromarray(np.random.RandomState(1).randint(0, 255, (30, 60, 3), dtype=np.uint8))  # 60 wide, 30 high
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the viewer turns the stored pixels 90 degrees clockwise
    stored.save(tmp_path / "photo.png", exif=exif)
    processor = PVCImageProcessor(image_size=28)
    out = processor(images=tmp_path / "photo.png")
    upright = stored.transpose(Image.Transpose.ROTATE_270)  # 30 wide, 60 high
    assert upright.size == (30, 60)
    torch.testing.assert_close(out["pixel_values"], processor(images=upright)["pixel_values"])


def test_bad_images_are_clear_errors(tmp_path):
    processor = PVCImageProcessor(image_size=28)
    with pytest.raises(ValueError, match="empty image"):
        processor(images=np.zeros((0, 5, 3), np.uint8))
    with pytest.raises(TypeError, match="Unsupported image type"):
        processor(images=123)
    with pytest.raises(ValueError, match="not found"):
        processor(images=str(tmp_path / "missing.png"))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="Could not read"):
        processor(images=str(tmp_path / "broken.png"))


def frame_indices(frames):
    return [int(np.asarray(frame.convert("L"), np.float32).mean(0).argmax()) // 4 for frame in frames]


@pytest.fixture(scope="module")
def video_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    write_video(folder / "short.mp4", 40)
    write_video(folder / "long.mp4", 200)
    write_video(folder / "long.ts", 200, codec="mpeg2video")  # MPEG-TS: seeking may land after the time asked for
    write_video(folder / "long.h264", 200, codec="libx264")  # raw stream: no length in any header, cannot seek
    write_video(folder / "long.mpg", 200, fps=25, codec="mpeg2video")  # MPEG-PS: its duration is a bitrate guess
    return folder


def load_video_indices(total, count, first=0, last=None):
    """The frames InternVL2's and PVC's own `load_video` picks (its `get_index`): the span from frame `first` to
    frame `last` (default the video's last) in `count` equal segments, the frame at each segment's middle."""
    last = total - 1 if last is None else last
    segment = (last - first) / count
    return [int(first + segment / 2 + np.round(segment * k)) for k in range(count)]


def every(step, count):
    """The middle frame of each run of `step` frames."""
    return [int((k + 0.5) * step) for k in range(count)]


def test_video_frames_as_the_original_load_video(video_files):
    processor = PVCImageProcessor(image_size=28)
    assert frame_indices(processor.sample_frames(video_files / "short.mp4", 8)) == load_video_indices(40, 8)
    # a long video, sparsely sampled: reached by seeking
    assert frame_indices(processor.sample_frames(video_files / "long.mp4", 5)) == load_video_indices(200, 5)
    # as many frames as the video has, or more: every frame, in order, evenly repeated (the authors' rule would
    # pick some twice and never the last)
    for count in (40, 64, 80):
        picked = frame_indices(processor.sample_frames(video_files / "short.mp4", count))
        assert picked == sorted(picked) and set(picked) == set(range(40)), count
        assert max(np.bincount(picked)) - min(np.bincount(picked)) <= 1, count
    # containers whose seeking or length need care, sampled sparsely (seeking) and densely: MPEG-TS (timestamps
    # starting late, imprecise seeking); a raw H.264 stream (no length in any header and no seeking: counted by
    # decoding); an MPEG program stream (its header duration, a guess from the bitrate, says 178 frames)
    for name in ("long.ts", "long.h264", "long.mpg"):
        for count in (5, 40):
            expected = load_video_indices(200, count)
            assert frame_indices(processor.sample_frames(video_files / name, count)) == expected, name


def test_video_fps_and_time_window(video_files):
    processor = PVCImageProcessor(image_size=28)
    # 10 fps video sampled at 2 fps: one frame in the middle of every 5
    assert frame_indices(processor.sample_frames(video_files / "short.mp4", fps=2)) == every(5, 8)
    # a cap on the count falls back to uniform sampling
    assert frame_indices(processor.sample_frames(video_files / "short.mp4", fps=5, max_frames=4)) == load_video_indices(
        40, 4
    )
    # seconds 1 to 3 are frames 10 .. 30, as the original `load_video(bound=(1, 3))` reads them
    window = processor.sample_frames(video_files / "short.mp4", 4, start=1.0, end=3.0)
    assert frame_indices(window) == load_video_indices(40, 4, first=10, last=30)
    window = processor.sample_frames(video_files / "short.mp4", 3, start=0.54, end=3.16)  # frames 5 .. 32
    assert frame_indices(window) == load_video_indices(40, 3, first=5, last=32)


def test_video_inputs_in_memory_follow_the_same_rule():
    processor = PVCImageProcessor(image_size=28, num_frames=3)
    video = np.zeros((9, 8, 36, 3), np.uint8)
    for index in range(9):
        video[index, :, 4 * index : 4 * index + 4] = 255
    expected = load_video_indices(9, 3)
    assert frame_indices(processor.sample_frames(video)) == expected
    assert frame_indices(processor.sample_frames(list(video))) == expected
    assert frame_indices(processor.sample_frames(torch.from_numpy(video))) == expected
    # all the frames given: each once (was [0, 1, 2, 3, 4, 4, 5, 6] for 8 of 8)
    for count in (8, 9):
        assert frame_indices(processor.sample_frames(video[:count], count)) == list(range(count))
    out = PVCVideoProcessor(image_size=28, num_frames=3)(videos=[video, list(video[:2])])
    assert out["video_num_frames"].tolist() == [3, 3] and out["pixel_values_videos"].shape == (6, 3, 28, 28)


def test_video_tiles_per_frame():
    processor = PVCVideoProcessor(image_size=28)
    video = np.zeros((4, 28, 56, 3), np.uint8)
    out = processor(videos=video, num_frames=4, video_max_tiles=2)
    assert out["video_num_tiles"].tolist() == [3]  # 2 tiles + thumbnail per frame
    assert out["pixel_values_videos"].shape == (12, 3, 28, 28)


def test_video_urls_are_read_by_ranges(video_files):
    """An http(s) URL is read as a file would be (PyAV fetches ranges and seeks); a dead one is a clear error."""
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=video_files))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    processor = PVCImageProcessor(image_size=28)
    try:
        url = f"http://127.0.0.1:{server.server_port}/long.mp4"
        assert frame_indices(processor.sample_frames(url, 5)) == load_video_indices(200, 5)
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(ValueError, match="Is the URL reachable"):
        processor.sample_frames(url, 5)


def test_image_urls_are_read_and_their_failures_named(tmp_path):
    """An http(s) image URL is read as the file; a 404, a reply that is no image and an unknown host are errors that
    name the URL and what went wrong (no bare UnidentifiedImageError or ConnectError)."""
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    array = np.random.RandomState(3).randint(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "picture.png")
    (tmp_path / "page.html").write_text("<html>not an image</html>")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=tmp_path))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    processor = PVCImageProcessor(image_size=28)
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        torch.testing.assert_close(
            processor(images=f"{base}/picture.png")["pixel_values"], processor(images=array)["pixel_values"]
        )
        with pytest.raises(ValueError, match=re.escape(f"Could not fetch the image {base}/missing.png: HTTP 404")):
            processor(images=f"{base}/missing.png")
        with pytest.raises(
            ValueError, match=re.escape(f"{base}/page.html did not return an image (content type text/html")
        ):
            processor(images=f"{base}/page.html")
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(ValueError, match=re.escape("Could not fetch the image http://pvc-test.invalid/a.png: ")):
        processor(images="http://pvc-test.invalid/a.png")


def test_bad_videos_are_clear_errors(tmp_path, video_files):
    processor = PVCVideoProcessor(image_size=28)
    (tmp_path / "corrupt.mp4").write_bytes(np.random.RandomState(0).bytes(5000))
    (tmp_path / "empty.mp4").write_bytes(b"")
    for name in ("corrupt.mp4", "empty.mp4"):
        with pytest.raises(ValueError, match="read the video|no video|no decodable|is empty"):
            processor(videos=str(tmp_path / name))
    with pytest.raises(ValueError, match="not found"):
        processor(videos=str(tmp_path / "missing.mp4"))
    with av.open(str(tmp_path / "no-frames.mp4"), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        container.start_encoding()  # a header, no frame
    with pytest.raises(ValueError, match="read the video|no video|no decodable"):
        processor(videos=str(tmp_path / "no-frames.mp4"))
    with pytest.raises(ValueError, match="num_frames"):
        processor(videos=str(video_files / "short.mp4"), num_frames=0)
    with pytest.raises(TypeError, match="Unsupported video type"):
        processor(videos=3.5)


def test_video_inputs_that_are_not_videos_say_what_they_are(tmp_path, video_files):
    """A picture passed as a video and a damaged file are named for what they are; a list of frame files is one
    video (as transformers' chat templates pass it), equal to the same frames given as arrays."""
    processor = PVCVideoProcessor(image_size=28)
    frames = [np.random.RandomState(index).randint(0, 256, (28, 28, 3), dtype=np.uint8) for index in range(3)]
    for index, frame in enumerate(frames):
        Image.fromarray(frame).save(tmp_path / f"frame{index}.png")
    files = [str(tmp_path / f"frame{index}.png") for index in range(3)]
    with pytest.raises(ValueError, match=re.escape("frame0.png is a picture (png_pipe), not a video")):
        processor(videos=files[0])
    as_files = processor(videos=files, num_frames=3)
    assert as_files["video_num_frames"].tolist() == [3]
    torch.testing.assert_close(
        as_files["pixel_values_videos"], processor(videos=[frames], num_frames=3)["pixel_values_videos"]
    )
    tiny = tiny_processor()
    messages = [{"role": "user", "content": [{"type": "video", "video": files}, {"type": "text", "text": "Hi"}]}]
    inputs = tiny.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt", num_frames=3)
    assert inputs["video_num_frames"].tolist() == [3]
    video = (video_files / "short.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(video[: len(video) // 3])
    (tmp_path / "noise.mp4").write_bytes(video[:64] + np.random.RandomState(0).bytes(4000))
    for name in ("cut.mp4", "noise.mp4"):
        with pytest.raises(ValueError, match="damaged"):
            processor(videos=str(tmp_path / name))


def context_tokens(input_ids):
    return int((input_ids == IMAGE_TOKEN).sum())


def test_prompt_expansion_and_token_counts():
    processor = tiny_processor()
    image = Image.new("RGB", (112, 56))  # 2 tiles + thumbnail
    video = np.zeros((3, 20, 20, 3), np.uint8)
    out = processor(text="<image>\nDescribe.", images=image)
    tiles = int(out["image_num_tiles"][0])
    assert tiles == 3 and context_tokens(out["input_ids"]) == 4 * 4 * tiles
    out = processor(text="<video>\nWhat happens?", videos=video, num_frames=3)
    assert context_tokens(out["input_ids"]) == 4 * 3
    text = processor.tokenizer.decode(out["input_ids"][0])
    assert text.startswith("Frame1: <img>") and "</img>\nFrame2: <img>" in text and "Frame3: <img>" in text
    assert "visual_order" not in out

    model = tiny_model("pvc")
    both = processor(text=["<video> then <image>", "<image>"], images=[image, image], videos=video, num_frames=3)
    assert both["visual_order"].tolist() == [1, 0, 0]
    with torch.no_grad():
        image_features = torch.cat(
            model.get_image_features(both["pixel_values"], both["image_num_tiles"]).pooler_output
        )
        video_features = torch.cat(
            model.get_video_features(both["pixel_values_videos"], both["video_num_frames"], return_dict=False)[1]
        )
        model(**both)  # the counts agree, or this raises
    assert image_features.shape[0] + video_features.shape[0] == context_tokens(both["input_ids"])


def test_placeholder_count_mismatch():
    processor = tiny_processor()
    image = Image.new("RGB", (56, 56))
    with pytest.raises(ValueError, match="1 <image> placeholder.*2 images"):
        processor(text="<image> hi", images=[image, image])
    with pytest.raises(ValueError, match="0 <video> placeholder.*1 videos"):
        processor(text="hi", videos=np.zeros((2, 8, 8, 3), np.uint8))


def test_chat_template_layout():
    processor = tiny_processor()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image", "path": "x.png"}, {"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Again"},
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|><|im_start|>user\n<image>\nHi<|im_end|>"
        "<|im_start|>assistant\nHello<|im_end|><|im_start|>user\nAgain<|im_end|><|im_start|>assistant\n"
    )


def test_end_to_end_batch_with_left_padding_matches_single_prompts(video_files):
    processor = tiny_processor()
    model = tiny_model("pvc")
    image = Image.fromarray(np.random.RandomState(0).randint(0, 255, (60, 130, 3), dtype=np.uint8))
    first = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]}]
    second = [
        {
            "role": "user",
            "content": [
                {"type": "video", "path": str(video_files / "short.mp4")},
                {"type": "text", "text": "And what happens in this longer clip?"},
            ],
        }
    ]

    def generate(conversations):
        inputs = processor.apply_chat_template(
            conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        output = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=1)
        return inputs, output[:, inputs["input_ids"].shape[1] :]

    batch_inputs, batched = generate([first, second])
    assert batch_inputs["attention_mask"][:, 0].tolist() in ([0, 1], [1, 0])  # lengths differ
    assert batch_inputs["input_ids"][batch_inputs["attention_mask"] == 0].eq(1).all()  # pad id, on the left
    assert batch_inputs["attention_mask"][:, -1].tolist() == [1, 1]
    assert torch.equal(batched[0:1], generate([first])[1])
    assert torch.equal(batched[1:2], generate([second])[1])


def test_processor_round_trip_with_remote_code(tmp_path, video_files):
    from transformers import AutoProcessor

    processor = tiny_processor()
    processor.save_pretrained(tmp_path)
    # The processor's files and those they import relatively (the visual bookkeeping, video decoding and processing)
    code = ("processing_pvc.py", "image_processing_pvc.py", "visuals_pvc.py", "video_decoding_pvc.py")
    for name in (*code, "video_processing_pvc.py", "video_preprocessor_config.json"):
        assert (tmp_path / name).exists(), name
    loaded = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(loaded).__name__ == "PVCProcessor" and type(loaded).__module__ != type(processor).__module__
    assert loaded.tokens_per_frame == 4 and loaded.image_repeat == 4
    assert loaded.chat_template == processor.chat_template
    image = Image.new("RGB", (90, 40), "blue")
    expected, actual = processor(text="<image>x", images=image), loaded(text="<image>x", images=image)
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    assert loaded.batch_decode(actual["input_ids"][:, -1:]) == ["x"]
    video = str(video_files / "long.mp4")
    expected, actual = processor(text="<video>x", videos=video), loaded(text="<video>x", videos=video)
    assert torch.equal(expected["pixel_values_videos"], actual["pixel_values_videos"])
    assert type(loaded.video_processor).__name__ == "PVCVideoProcessor"
    assert type(loaded.video_processor).__module__ != type(processor.video_processor).__module__  # the saved code


@settings(max_examples=60, deadline=None)
@given(
    width=st.integers(1, 3000),
    height=st.integers(1, 3000),
    max_tiles=st.integers(1, 12),
    min_tiles=st.integers(1, 12),
)
def test_tiling_properties(width, height, max_tiles, min_tiles):
    min_tiles = min(min_tiles, max_tiles)
    columns, rows = tile_grid(width, height, min_tiles, max_tiles, 448)
    assert min_tiles <= columns * rows <= max_tiles


@settings(max_examples=25, deadline=None)
@given(width=st.integers(1, 400), height=st.integers(1, 400), max_tiles=st.integers(1, 6))
def test_processor_properties(width, height, max_tiles):
    processor = tiny_processor(max_tiles=max_tiles)
    out = processor(text="<image>", images=Image.new("RGB", (width, height)))
    tiles = int(out["image_num_tiles"][0])
    assert 1 <= tiles <= max_tiles + 1 and (tiles == 1 or tiles > 2)  # a thumbnail comes only with 2+ tiles
    assert out["pixel_values"].shape == (tiles, 3, 56, 56)
    assert context_tokens(out["input_ids"]) == 4 * 4 * tiles


# Writing a display matrix needs a newer PyAV than the floor environment's 12 (18 has it); PyAV 12 reads such files
# the same (checked by hand on files PyAV 18 wrote) but cannot write them.
writes_display_matrix = pytest.mark.skipif(
    not hasattr(av.video.stream.VideoStream, "set_display_rotation"), reason="this PyAV cannot write a display matrix"
)


@writes_display_matrix
@pytest.mark.parametrize("degrees", [90, -90, 180])
def test_rotated_videos_come_out_upright(tmp_path, degrees):
    """A phone video stores its frames sideways and a display matrix that turns them; viewers (and we) apply it."""
    stored = np.zeros((32, 64, 3), np.uint8)
    stored[:8, :16] = 255  # a white block in the stored frame's top-left corner
    path = tmp_path / f"rotated{degrees}.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        stream.set_display_rotation(degrees)  # counter-clockwise, as ffmpeg's display matrix
        for _ in range(3):
            for packet in stream.encode(av.VideoFrame.from_ndarray(stored, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    expected = np.rot90(stored, k=degrees // 90)  # numpy turns counter-clockwise for positive k
    for frame in PVCImageProcessor(image_size=28).sample_frames(path, 2):
        shown = np.asarray(frame.convert("L"), np.float32)
        assert shown.shape == expected.shape[:2]
        assert np.abs(shown - expected[..., 0]).mean() < 8  # codec noise only


@pytest.mark.parametrize(
    "degrees, hflip, vflip", [(0, True, False), (0, False, True), (90, True, False), (-90, False, True)]
)
@writes_display_matrix
def test_mirrored_videos_come_out_as_shown(tmp_path, degrees, hflip, vflip):
    """A display matrix may mirror as well as turn (a front camera); a rotation alone read from it would show a
    horizontal mirror as a 180-degree turn and ignore a vertical one. The mirror applies after the turn, as
    PyAV's `set_display_rotation` documents and ffmpeg's player shows it."""
    stored = np.zeros((32, 64, 3), np.uint8)
    stored[:8, :16] = 255  # a white block in the stored frame's top-left corner
    path = tmp_path / "mirrored.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        stream.set_display_rotation(degrees, hflip=hflip, vflip=vflip)
        for _ in range(3):
            for packet in stream.encode(av.VideoFrame.from_ndarray(stored, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    expected = np.rot90(stored, k=degrees // 90)
    expected = np.fliplr(expected) if hflip else np.flipud(expected) if vflip else expected
    for frame in PVCImageProcessor(image_size=28).sample_frames(path, 2):
        shown = np.asarray(frame.convert("L"), np.float32)
        assert shown.shape == expected.shape[:2]
        assert np.abs(shown - expected[..., 0]).mean() < 8  # codec noise only


@pytest.mark.parametrize("degrees", [90, 270])
def test_legacy_rotate_tag_turns_frames(tmp_path, degrees):
    """Files without a display matrix may carry the older `rotate` tag (clockwise degrees; Matroska keeps it)."""
    stored = np.zeros((32, 64, 3), np.uint8)
    stored[:8, :16] = 255
    path = tmp_path / "tagged.mkv"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        stream.metadata["rotate"] = str(degrees)
        for _ in range(3):
            for packet in stream.encode(av.VideoFrame.from_ndarray(stored, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    expected = np.rot90(stored, k=-degrees // 90)  # clockwise
    for frame in PVCImageProcessor(image_size=28).sample_frames(path, 2):
        shown = np.asarray(frame.convert("L"), np.float32)
        assert shown.shape == expected.shape[:2] and np.abs(shown - expected[..., 0]).mean() < 8


# A variable-frame-rate file: 2 s at 10 fps, then 1 s at 40 fps (frame i at VFR_MS[i] milliseconds).
VFR_MS = [100 * k for k in range(20)] + [2000 + 25 * k for k in range(40)]


def write_vfr_video(path):
    from fractions import Fraction

    width = 4 * len(VFR_MS) + 8
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=40)
        stream.width, stream.height, stream.pix_fmt = width, 32, "yuv420p"
        stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)
        for index, milliseconds in enumerate(VFR_MS):
            array = np.zeros((32, width, 3), np.uint8)
            array[:, 4 * index : 4 * index + 4] = 255  # read back by frame_indices
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts, frame.time_base = milliseconds, Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def nearest_frames(instants_ms):
    return [min(range(len(VFR_MS)), key=lambda i: (abs(VFR_MS[i] - t), i)) for t in instants_ms]


def test_variable_frame_rate_videos_are_sampled_by_timestamps(tmp_path):
    """Each rule's instants are spread evenly in time from the first to the last frame (at a constant rate they are
    the frames the authors' rules pick), and each instant takes the frame nearest to it in time. Sampling by the
    average rate (an index per 1/rate seconds) took a later frame in the 10 fps stretch."""
    path = tmp_path / "vfr.mp4"
    write_vfr_video(path)
    processor = PVCImageProcessor(image_size=28)
    total, span = len(VFR_MS), VFR_MS[-1] - VFR_MS[0]

    def at(grid, first=0, last=total - 1):  # instants of a rule's picks on `count` evenly spaced points
        return [VFR_MS[first] + (VFR_MS[last] - VFR_MS[first]) * k / (last - first) for k in grid]

    picked = frame_indices(processor.sample_frames(path, 6))
    assert picked == nearest_frames(at(load_video_indices(total, 6)))
    assert picked[:4] == [2, 7, 12, 17]  # by hand: 0.2, 0.7, 1.2, 1.7 s, one frame in ten in the first 2 s
    # fps: an instant every 1/fps seconds (every `step` points of the grid), each frame at most once
    step = (total - 1) / span * 1000 / 2
    picked = frame_indices(processor.sample_frames(path, fps=2))
    assert picked == nearest_frames(at(every(step, int(total / step))))
    # a time window: 2 s to 3 s is the 40 fps stretch
    picked = frame_indices(processor.sample_frames(path, 4, start=2.0, end=3.0))
    assert picked == nearest_frames(at(load_video_indices(40, 4), 20, 59)) and picked[0] >= 20
    # as many frames as the video has: each once, by position
    assert frame_indices(processor.sample_frames(path, total)) == list(range(total))


@pytest.mark.parametrize(
    "mode, values, expected",
    [
        ("I;16", [0, 32768, 65535], [0, 128, 255]),  # 16 bits: by the type's range
        ("I", [-1000, 0, 1000], [0, 128, 255]),  # 32-bit integers: by the image's own range
        ("F", [0.5, 1.0, 1.5], [0, 128, 255]),
    ],
)
def test_high_bit_depth_images_are_scaled_not_clipped(mode, values, expected):
    array = np.array([values] * 3, dtype={"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode])
    image = Image.fromarray(array, mode=mode) if mode != "I;16" else Image.fromarray(array).convert("I;16")
    assert image.mode == mode
    rgb = np.asarray(to_pil(image))
    assert rgb.shape == (3, 3, 3) and np.abs(rgb[0, :, 0].astype(int) - expected).max() <= 1
    # a 16-bit array too
    assert np.asarray(to_pil(np.array([[0, 65535]], np.uint16)))[0, :, 0].tolist() == [0, 255]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"fps": 0}, "fps must be a positive"),
        ({"fps": -2}, "fps must be a positive"),
        ({"num_frames": 0}, "num_frames must be"),
        ({"num_frames": -3}, "num_frames must be"),
        ({"fps": 2, "max_frames": 0}, "max_frames must be"),
        ({"fps": 2, "max_frames": -1}, "max_frames must be"),
        ({"start": -1.0}, "start must be"),
        ({"start": 2.0, "end": 1.0}, "must not come before"),
    ],
)
def test_bad_sampling_options_are_clear_errors(video_files, options, message):
    with pytest.raises(ValueError, match=message):
        PVCImageProcessor(image_size=28).sample_frames(video_files / "short.mp4", **options)


def test_fps_above_the_video_rate_takes_each_frame_once(video_files):
    processor = PVCImageProcessor(image_size=28)  # the file has 40 frames at 10 fps
    for fps in (10, 25, 1000):
        assert frame_indices(processor.sample_frames(video_files / "short.mp4", fps=fps)) == list(range(40)), fps


def image_message(item, text="What?"):
    return [{"role": "user", "content": [item, {"type": "text", "text": text}]}]


def test_truncation_into_visual_tokens_is_an_error():
    processor = tiny_processor()
    image = Image.new("RGB", (56, 56), "red")  # one tile: 16 context tokens
    full = processor(text="<image> a question", images=[image])["input_ids"].shape[1]
    with pytest.raises(ValueError, match="cuts into the visual tokens of sample 0"):
        processor(text="<image> a question", images=[image], truncation=True, max_length=10)
    kept = processor(text="<image> a question", images=[image], truncation=True, max_length=full - 3)  # text only
    assert int((kept["input_ids"] == IMAGE_TOKEN).sum()) == 16


def test_empty_media_lists_are_no_media():
    processor = tiny_processor()
    out = processor(text=["no media here", "nor here"], images=[], videos=[])
    assert set(out) == {"input_ids", "attention_mask"}
    with pytest.raises(ValueError, match="1 <image> placeholder"):
        processor(text="<image>", images=[])


def test_return_tensors_none_gives_lists():
    processor = tiny_processor()
    out = processor(text="<image> hi", images=[Image.new("RGB", (112, 56))], return_tensors=None)
    assert isinstance(out["input_ids"], list) and isinstance(out["input_ids"][0], list)
    assert out["image_num_tiles"] == [3]  # 2 tiles + thumbnail
    assert isinstance(out["pixel_values"], list) and len(out["pixel_values"]) == 3
    assert isinstance(out["pixel_values"][0], np.ndarray) and out["pixel_values"][0].shape == (3, 56, 56)
    chat = processor.apply_chat_template(
        image_message({"type": "image", "image": Image.new("RGB", (56, 56))}), tokenize=True, return_dict=True
    )
    assert isinstance(chat["input_ids"], list) and chat["image_num_tiles"] == [1]


def test_chat_template_options_as_keywords_or_processor_kwargs():
    processor = tiny_processor()
    video = np.zeros((12, 28, 28, 3), np.uint8)
    messages = image_message({"type": "video", "video": video})
    common = dict(tokenize=True, return_dict=True, return_tensors="pt")
    assert processor.apply_chat_template(messages, num_frames=3, **common)["video_num_frames"].tolist() == [3]
    out = processor.apply_chat_template(messages, processor_kwargs={"num_frames": 5}, **common)
    assert out["video_num_frames"].tolist() == [5]
    assert int((out["input_ids"] == IMAGE_TOKEN).sum()) == 5 * 4
    with pytest.raises(TypeError, match="num_frame"):  # a typo must not silently do nothing
        processor.apply_chat_template(messages, num_frame=4, **common)
    with pytest.raises(TypeError, match="num_frame"):
        processor.apply_chat_template(messages, processor_kwargs={"num_frame": 4}, **common)
    with pytest.raises(TypeError, match="max_tile"):
        processor(text="<video>", videos=[video], max_tile=2)


def test_openai_style_image_and_video_urls(video_files):
    import base64
    import io

    processor = tiny_processor()
    image = Image.new("RGB", (56, 56), (200, 30, 90))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    common = dict(tokenize=True, return_dict=True, return_tensors="pt")
    reference = processor.apply_chat_template(image_message({"type": "image", "image": image}), **common)
    for item in (
        {"type": "image_url", "image_url": {"url": data_url}},
        {"type": "image_url", "image_url": data_url},
    ):
        out = processor.apply_chat_template(image_message(item), **common)
        assert torch.equal(out["input_ids"], reference["input_ids"])
        torch.testing.assert_close(out["pixel_values"], reference["pixel_values"])
    mp4 = (video_files / "short.mp4").read_bytes()
    video_url = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(mp4).decode()}}
    out = processor.apply_chat_template(image_message(video_url), num_frames=4, **common)
    from_file = processor.apply_chat_template(
        image_message({"type": "video", "path": str(video_files / "short.mp4")}), num_frames=4, **common
    )
    torch.testing.assert_close(out["pixel_values_videos"], from_file["pixel_values_videos"])
    with pytest.raises(ValueError, match="'audio' are not supported"):
        processor.apply_chat_template(image_message({"type": "audio", "audio": "x.wav"}), **common)


MEAN, STD = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)


def internvl2_model_card_pixels(image, max_num, image_size):
    """InternVL2's preprocessing as its model card publishes it (`dynamic_preprocess` + `build_transform`), written
    out here: the closest aspect-ratio grid, the whole image resized to it (PIL's default bicubic), crops taken row
    by row, a thumbnail resized from the original image, then Resize + ToTensor + ImageNet Normalize."""
    width, height = image.size
    aspect = width / height
    ratios = sorted(
        {(i, j) for n in range(1, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1) if i * j <= max_num},
        key=lambda ratio: ratio[0] * ratio[1],
    )
    best_difference, best = float("inf"), (1, 1)
    for ratio in ratios:
        difference = abs(aspect - ratio[0] / ratio[1])
        if difference < best_difference:
            best_difference, best = difference, ratio
        elif difference == best_difference and width * height > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
            best = ratio
    target_width, target_height = image_size * best[0], image_size * best[1]
    resized = image.resize((target_width, target_height))
    columns = target_width // image_size
    tiles = []
    for i in range(best[0] * best[1]):
        box = ((i % columns) * image_size, (i // columns) * image_size)
        tiles.append(resized.crop((box[0], box[1], box[0] + image_size, box[1] + image_size)))
    if len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size)))
    return torch.stack([model_card_transform(tile, image_size) for tile in tiles])


def model_card_transform(image, image_size):
    """T.Resize((s, s), BICUBIC), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)."""
    array = np.asarray(image.convert("RGB").resize((image_size, image_size), Image.BICUBIC), np.float32) / 255.0
    return torch.from_numpy(((array - MEAN) / STD).transpose(2, 0, 1).copy())


def assert_pixels_match(ours, expected, backend, mean=MEAN, std=STD):
    """The PIL backend gives the model card's pixels exactly (the same PIL resize); torchvision's bicubic differs
    from PIL's by rounding: at most 2 of 255 levels (transformers' own test of its two backends allows as much)."""
    assert ours.shape == expected.shape
    if backend == "pil":
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    else:
        levels = (ours - expected).abs() * torch.from_numpy(np.asarray(std, np.float32)).view(1, 3, 1, 1) * 255
        assert float(levels.max()) <= 2.0 + 1e-3, float(levels.max())
        assert float(levels.mean()) < 0.5, float(levels.mean())  # rounding, not a shifted or blurred picture


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", [(168, 112), (112, 168), (250, 70), (60, 60), (1000, 700)])
def test_pixels_equal_internvl2_model_card_preprocessing(size, backend):
    """Grids whose row-major and column-major orders differ (3 x 2, 2 x 3, 6 x 1), a single tile and a photo cut
    down several times its size, on each backend."""
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    ours = PVCImageProcessor(image_size=56, max_tiles=6, backend=backend)(images=[image])["pixel_values"]
    assert_pixels_match(ours, internvl2_model_card_pixels(image, 6, 56), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_video_frames_and_tiled_video_layout_as_the_model_card(backend):
    """A video frame is `build_transform` of the frame (one tile); with tiles per frame, the rows are frame-major:
    frame 1's tiles (dynamic_preprocess of that frame), then frame 2's."""
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 40, 90, 3), dtype=np.uint8)
    processor = PVCVideoProcessor(image_size=28, num_frames=3, backend=backend)
    single = processor(videos=[frames])["pixel_values_videos"]
    expected = torch.stack([model_card_transform(Image.fromarray(frame), 28) for frame in frames])
    assert_pixels_match(single, expected, backend)
    tiled = processor(videos=[frames], video_max_tiles=4)
    per_frame = [internvl2_model_card_pixels(Image.fromarray(frame), 4, 28) for frame in frames]
    assert tiled["video_num_tiles"].tolist() == [per_frame[0].shape[0]] and per_frame[0].shape[0] > 1
    assert_pixels_match(tiled["pixel_values_videos"], torch.cat(per_frame), backend)


def test_tiled_video_through_processor_and_model():
    """Tokens per frame count every tile, and the model writes them frame-major: frame 1 (tile 1..P), frame 2, ...
    Each tile position is its own stream over the frames, encoded here alone as the reference."""
    processor = tiny_processor()
    model = tiny_model("pvc")
    frames = np.random.default_rng(1).integers(0, 256, (3, 56, 112, 3), dtype=np.uint8)  # 2 tiles + thumbnail
    inputs = processor(text="<video> what?", videos=[frames], num_frames=3, video_max_tiles=2)
    tiles = int(inputs["video_num_tiles"][0])
    assert tiles == 3 and int((inputs["input_ids"] == IMAGE_TOKEN).sum()) == 3 * tiles * 4
    pixels = inputs["pixel_values_videos"].view(3, tiles, 3, 56, 56)  # frame-major rows
    with torch.no_grad():
        (features,) = model.model.get_video_features(
            inputs["pixel_values_videos"], inputs["video_num_frames"], inputs["video_num_tiles"]
        ).pooler_output
        streams = [model.model.encode_clips(pixels[:, p], num_frames=3)[0] for p in range(tiles)]  # [T, M, D] each
    expected = torch.cat([streams[p][t] for t in range(3) for p in range(tiles)])
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


def test_remote_code_files_need_only_the_core_requirements():
    """transformers refuses to load remote code whose unguarded imports are missing: PyAV (videos) must stay
    optional, so that a user with images only can load the processor."""
    from transformers.dynamic_module_utils import get_imports

    from pvc.conversion.options import CODE_FILES

    root = Path(__file__).resolve().parents[1]
    core = {"torch", "transformers", "numpy", "PIL", "einops"}
    for name in CODE_FILES:
        third_party = {module for module in get_imports(root / name) if module not in sys.stdlib_module_names}
        assert third_party <= core, (name, third_party - core)


# ---------------------------------------------------------------------------------------------------------------
# transformers' processor conventions: typed kwargs, standard pixel options, chat-template features
# ---------------------------------------------------------------------------------------------------------------


def picture(width=112, height=56, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_options_flat_or_per_sub_processor_give_the_same_inputs():
    """transformers' typed kwargs: the same options flat, in text_kwargs / images_kwargs / videos_kwargs, or in
    common_kwargs, are routed to the same sub-processor."""
    processor = tiny_processor()
    video = np.zeros((6, 28, 28, 3), np.uint8)
    args = dict(text=["<image> and <video>", "x"], images=[picture()], videos=[video])
    flat = processor(**args, max_tiles=1, num_frames=3, padding="max_length", max_length=90, return_tensors="pt")
    nested = processor(
        **args,
        images_kwargs={"max_tiles": 1},
        videos_kwargs={"num_frames": 3},
        text_kwargs={"padding": "max_length", "max_length": 90},
        common_kwargs={"return_tensors": "pt"},
    )
    # what the options ask for: one tile (not 2 + thumbnail), 3 frames (not 4), 90 tokens a sample
    assert flat["image_num_tiles"].tolist() == [1] and flat["video_num_frames"].tolist() == [3]
    assert flat["input_ids"].shape == (2, 90)
    assert sorted(flat) == sorted(nested)
    for key in flat:
        assert torch.equal(flat[key], nested[key]), key


@pytest.mark.parametrize(
    "options, named",
    [
        ({"max_tile": 2}, "max_tile"),
        ({"images_kwargs": {"num_frame": 2}}, "num_frame"),
        ({"videos_kwargs": {"max_tiles": 2}}, "max_tiles"),  # an image option where video options go
        ({"text_pair": "more text"}, "text_pair"),
        ({"audio_kwargs": {"sampling_rate": 16000}}, "sampling_rate"),
    ],
)
def test_an_option_nothing_takes_is_an_error(options, named):
    with pytest.raises(TypeError, match=named):
        tiny_processor()(text="<image>", images=[picture()], **options)


def test_audio_none_or_empty_is_accepted_and_audio_refused():
    processor = tiny_processor()
    plain = processor(text="<image>", images=[picture()])
    for empty in (dict(audio=None), dict(audios=None), dict(audio=[]), dict(audios=[])):
        assert torch.equal(processor(text="<image>", images=[picture()], **empty)["input_ids"], plain["input_ids"])
    with pytest.raises(ValueError, match="not audio"):
        processor(text="<image>", images=[picture()], audio=[np.zeros(16000, np.float32)])


def one_tile_by_hand(image, size=56):
    """The single tile of an image at max_tiles=1, as uint8 HWC: the whole image resized (InternVL's BICUBIC)."""
    return np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_standard_pixel_options_are_honoured_in_a_call_and_at_construction(backend):
    image = picture(80, 56)
    raw = torch.from_numpy(one_tile_by_hand(image)).permute(2, 0, 1)[None]  # [1, 3, S, S], 0..255
    processor = PVCImageProcessor(image_size=56, max_tiles=1, backend=backend)
    cases = [  # (options, expected, the mean and std of `expected`'s units, to compare in 8-bit levels)
        (dict(do_normalize=False), raw / 255, (0, 0, 0), (1, 1, 1)),
        (dict(do_normalize=False, rescale_factor=1 / 127.5), raw / 127.5, (0, 0, 0), (0.5, 0.5, 0.5)),
        (dict(do_rescale=False, do_normalize=False), raw, (0, 0, 0), (1 / 255,) * 3),
        (dict(image_mean=[0.5] * 3, image_std=[0.25] * 3), (raw / 255 - 0.5) / 0.25, (0.5,) * 3, (0.25,) * 3),
    ]
    for options, expected, mean, std in cases:
        in_a_call = processor(images=[image], **options)["pixel_values"]
        built = PVCImageProcessor(image_size=56, max_tiles=1, backend=backend, **options)
        at_construction = built(images=[image])["pixel_values"]
        assert_pixels_match(in_a_call, expected, backend, mean, std)
        assert_pixels_match(at_construction, expected, backend, mean, std)
    # the same options through the processor, flat and in images_kwargs
    full = tiny_processor(max_tiles=1)
    full.image_processor.backend = backend
    for options in (dict(do_normalize=False), dict(images_kwargs={"do_normalize": False})):
        ours = full(text="<image>", images=[image], **options)["pixel_values"]
        assert_pixels_match(ours, raw / 255, backend, (0, 0, 0), (1, 1, 1))


def test_input_data_format_and_do_convert_rgb():
    processor = PVCImageProcessor(image_size=56, max_tiles=1)
    array = np.asarray(picture(70, 56))  # HWC
    expected = processor(images=[array])["pixel_values"]
    channels_first = np.ascontiguousarray(array.transpose(2, 0, 1))
    from transformers.image_utils import ChannelDimension

    for layout in ("channels_first", ChannelDimension.FIRST):
        assert torch.equal(processor(images=[channels_first], input_data_format=layout)["pixel_values"], expected)
    assert torch.equal(processor(images=[array], input_data_format="channels_last")["pixel_values"], expected)
    assert torch.equal(processor(images=[picture(70, 56)], do_convert_rgb=False)["pixel_values"], expected)
    with pytest.raises(ValueError, match="mode L"):
        processor(images=[picture(70, 56).convert("L")], do_convert_rgb=False)
    with pytest.raises(ValueError, match="input_data_format"):
        processor(images=[array], input_data_format="sideways")


@pytest.mark.parametrize("option", [{"do_resize": False}, {"crop_size": 28}, {"resample": 3}])
def test_standard_options_that_tiling_replaces_are_refused(option):
    with pytest.raises(ValueError, match="tiles"):
        PVCImageProcessor(**option)
    with pytest.raises(ValueError, match="tiles"):
        tiny_processor()(text="<image>", images=[picture()], **option)


def test_size_is_the_tile_limit_as_a_shape(tmp_path):
    """transformers' `size` (at construction, in from_pretrained, set, or in a call) gives the tile limit as the
    largest shape an image is tiled at: rows x columns whole tiles allow rows * columns tiles, the same inputs as that
    `max_tiles`; anything else is an error naming the tile size. transformers 5.25 loads processors this way."""
    photo = picture(400, 300)  # 4:3, cut into 4 x 3 = 12 tiles + thumbnail when 12 are allowed
    limits = {(56, 56): 1, (112, 112): 4, (112, 168): 6, (168, 224): 12}
    for (height, width), tiles in limits.items():
        size = {"height": height, "width": width}
        expected = PVCImageProcessor(image_size=56, max_tiles=tiles)(images=[photo])
        built = PVCImageProcessor(image_size=56, size=size)
        called = PVCImageProcessor(image_size=56, max_tiles=2)(images=[photo], size=size)
        for output in (built(images=[photo]), called):
            assert torch.equal(output["image_num_tiles"], expected["image_num_tiles"])
            assert torch.equal(output["pixel_values"], expected["pixel_values"])
        assert built.max_tiles == tiles
    PVCImageProcessor(image_size=56, max_tiles=1).save_pretrained(tmp_path)
    loaded = PVCImageProcessor.from_pretrained(tmp_path, size={"height": 112, "width": 168})
    assert loaded.max_tiles == 6 and loaded.size == {"height": 112, "width": 168}
    processor = tiny_processor(max_tiles=1)
    processor.image_processor.size = {"height": 168, "width": 224}
    assert processor.image_processor.max_tiles == 12
    processor.video_processor.size = {"height": 112, "width": 112}
    assert processor.video_processor.video_max_tiles == 4
    counted = processor._get_num_multimodal_tokens(
        image_sizes=[(100, 400)], images_kwargs={"size": {"height": 56, "width": 112}}
    )
    assert counted["num_image_patches"] == [3]  # 2 tiles + thumbnail (12 + 1 at the processor's limit)
    for bad in ({"height": 100, "width": 56}, {"shortest_edge": 56}, {"height": 0, "width": 56}):
        with pytest.raises(ValueError, match="56"):
            PVCImageProcessor(image_size=56, size=bad)
    with pytest.raises(ValueError, match="give one of them"):
        PVCImageProcessor(image_size=56, max_tiles=2)(images=[photo], size={"height": 112, "width": 112}, max_tiles=2)


def test_mm_token_type_ids_mark_images_1_and_videos_2():
    processor = tiny_processor(max_tiles=1)
    video = np.zeros((3, 28, 28, 3), np.uint8)
    out = processor(
        text=["<video> then <image>", "<image>"],
        images=[picture(), picture()],
        videos=[video],
        num_frames=3,
        return_mm_token_type_ids=True,
    )
    types = out["mm_token_type_ids"]
    # by hand: 4 tokens a frame; the video 3 frames, each image a 4-frame static clip of one tile
    assert (types[0] == 2).sum() == 12 and (types[0] == 1).sum() == 16 and (types[1] == 1).sum() == 16
    assert torch.equal(types > 0, out["input_ids"] == IMAGE_TOKEN)
    first_video, first_image = int((types[0] == 2).nonzero()[0]), int((types[0] == 1).nonzero()[0])
    assert first_video < first_image  # in text order


def test_do_sample_frames_false_keeps_the_given_frames(video_files):
    processor = tiny_processor()
    frames = np.stack([np.full((28, 28, 3), 40 * index, np.uint8) for index in range(5)])
    out = processor(text="<video>", videos=[frames], do_sample_frames=False)
    assert out["video_num_frames"].tolist() == [5]  # not the processor's num_frames (4)
    counted = processor._get_num_multimodal_tokens(video_sizes=[(5, 28, 28)], do_sample_frames=False)
    assert counted["num_video_tokens"] == [int((out["input_ids"] == IMAGE_TOKEN).sum())]
    with pytest.raises(ValueError, match="frames"):
        processor(text="<video>", videos=[frames], do_sample_frames=False, num_frames=2)
    with pytest.raises(ValueError, match="file"):
        processor(text="<video>", videos=[str(video_files / "short.mp4")], do_sample_frames=False)


def conversation(image):
    return [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "a cat"},
        {"role": "user", "content": "And its colour?"},
        {"role": "assistant", "content": [{"type": "text", "text": "grey"}]},
    ]


def test_assistant_tokens_mask_covers_what_the_assistant_says():
    """TRL's assistant-only loss: 1 at every token of the assistant's answers (their end-of-turn token included),
    0 elsewhere, also after an image placeholder grew into its visual tokens and under left padding."""
    processor = tiny_processor()
    chats = [conversation(picture()), conversation(picture(56, 56))[:2]]
    out = processor.apply_chat_template(
        chats, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt"
    )
    assert sorted(out) == sorted(["input_ids", "attention_mask", "pixel_values", "image_num_tiles", "assistant_masks"])
    decode = processor.tokenizer.decode
    for ids, mask, answers in zip(out["input_ids"], out["assistant_masks"], (["a cat", "grey"], ["a cat"])):
        runs = [decode(ids[run]) for run in _runs(mask.bool())]
        assert runs == [answer + "<|im_end|>" for answer in answers]
    plain = processor.apply_chat_template(chats, tokenize=True, return_dict=True, return_tensors="pt")
    assert torch.equal(plain["input_ids"], out["input_ids"])  # the mask changes nothing else


def _runs(mask):
    """Index tensors of the runs of True in a 1-d boolean mask."""
    positions = mask.nonzero().flatten().tolist()
    runs, current = [], []
    for position in positions:
        if current and position != current[-1] + 1:
            runs.append(current)
            current = []
        current.append(position)
    return [torch.tensor(run) for run in runs + ([current] if current else [])]


def test_assistant_tokens_mask_needs_generation_blocks():
    processor = tiny_processor()
    template = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="generation"):
        processor.apply_chat_template(
            [{"role": "user", "content": "hi"}],
            chat_template=template,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )


def test_chat_template_takes_message_objects_and_template_variables(caplog):
    import dataclasses

    @dataclasses.dataclass
    class Message:
        role: str
        content: str
        name: str | None = None

    processor = tiny_processor()
    as_dicts = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    as_objects = [Message("user", "hi"), Message("assistant", "hello")]
    assert processor.apply_chat_template(as_objects) == processor.apply_chat_template(as_dicts)
    # a variable the template reads
    template = "{% if shout %}{{ messages[0]['content'] | upper }}{% else %}{{ messages[0]['content'] }}{% endif %}"
    assert processor.apply_chat_template(as_dicts, chat_template=template, shout=True) == "HI"
    # one it does not read: ignored, and said so; one that looks like a misspelt option: an error
    with caplog.at_level("WARNING"):
        assert processor.apply_chat_template(as_dicts, add_system_prompt=False) == processor.apply_chat_template(
            as_dicts
        )
    assert "add_system_prompt" in caplog.text
    with pytest.raises(TypeError, match="did you mean 'max_tiles'"):
        processor.apply_chat_template(as_dicts, max_tile=2)


def test_the_image_processor_sends_videos_to_the_video_processor():
    with pytest.raises(TypeError, match="videos go to PVCVideoProcessor"):
        PVCImageProcessor()(videos=[np.zeros((2, 8, 8, 3), np.uint8)])


def test_backend_is_chosen_as_transformers_chooses(tmp_path, monkeypatch):
    """torchvision where it loads, else PIL; `backend=` or the older `use_fast=` at construction and in
    from_pretrained; asking for torchvision where it does not load is an error, never a quiet PIL; not saved."""
    from pvc import image_processing_pvc

    expected_default = "torchvision" if torchvision_loads() else "pil"
    assert PVCImageProcessor().backend == expected_default
    assert PVCImageProcessor(backend="pil").backend == "pil" and PVCImageProcessor(use_fast=False).backend == "pil"
    PVCImageProcessor(image_size=56).save_pretrained(tmp_path)
    assert "backend" not in (tmp_path / "preprocessor_config.json").read_text()
    assert PVCImageProcessor.from_pretrained(tmp_path, backend="pil").backend == "pil"
    assert PVCImageProcessor.from_pretrained(tmp_path, use_fast=False).backend == "pil"
    with pytest.raises(ValueError, match="give one"):
        PVCImageProcessor(backend="torchvision", use_fast=False)
    with pytest.raises(ValueError, match="Unknown backend 'numpy'"):
        PVCImageProcessor(backend="numpy")
    monkeypatch.setattr(image_processing_pvc, "torchvision_loads", lambda: False)
    assert PVCImageProcessor().backend == "pil"
    for options in ({"backend": "torchvision"}, {"use_fast": True}):
        with pytest.raises(ImportError, match="needs torchvision"):
            PVCImageProcessor(**options)
        with pytest.raises(ImportError, match="needs torchvision"):
            PVCImageProcessor.from_pretrained(tmp_path, **options)
    processor = PVCImageProcessor(backend="pil")
    with pytest.raises(ImportError, match="needs torchvision"):
        processor.backend = "torchvision"


def test_media_nested_per_sample_must_match_each_samples_placeholders():
    """images=[[a, b], []] for prompts with one <image> each gave prompt 2 the image meant for prompt 1; per-sample
    lists are checked against their own prompt (as Idefics3's, SmolVLM's and Mllama's processors do), before any
    pixel is read; correct per-sample lists equal the flat list."""
    processor = tiny_processor(max_tiles=1)
    a, b = picture(seed=1), picture(seed=2)
    with pytest.raises(ValueError, match="Prompt 0 holds 1 <image> placeholder.* has 2"):
        processor(text=["<image>first", "<image>second"], images=[[a, b], []])
    with pytest.raises(ValueError, match="2 lists for 3 prompts"):
        processor(text=["<image>", "<image>", "x"], images=[[a], [b]])
    with pytest.raises(ValueError, match="mix per-sample lists and single items"):
        processor(text=["<image>", "<image>"], images=[[a], b])
    nested = processor(text=["<image>first", "<image>second"], images=[[a], [b]])
    flat = processor(text=["<image>first", "<image>second"], images=[a, b])
    assert torch.equal(nested["pixel_values"], flat["pixel_values"])
    clip = np.zeros((4, 28, 28, 3), np.uint8)
    with pytest.raises(ValueError, match="Prompt 0 holds 1 <video> placeholder.* has 0"):
        processor(text=["<video>", "none"], videos=[[], [clip]])
    # a list of frames is one video, not a sample
    frames = [clip[0], clip[1], clip[2]]
    assert processor(text=["<video>"], videos=[frames])["video_num_frames"].tolist() == [4]


def test_an_image_past_the_decompression_bomb_limit_names_the_file_and_the_way_out(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    Image.new("RGB", (300, 200)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # 60,000 pixels is then over twice the limit
    with pytest.raises(ValueError, match=re.escape(f"The image {path} is too large to open safely: Image size (60000")):
        PVCImageProcessor(image_size=28)(images=str(path))
    with pytest.raises(ValueError, match=re.escape("PIL.Image.MAX_IMAGE_PIXELS = None")):
        PVCImageProcessor(image_size=28)(images=str(path))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert PVCImageProcessor(image_size=28, max_tiles=1)(images=str(path))["image_num_tiles"].tolist() == [1]
