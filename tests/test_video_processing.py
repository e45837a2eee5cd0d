"""PVCVideoProcessor on transformers' video-processor conventions: saved and loaded as transformers saves video
processors, VideoMetadata in and out, fps sampling from metadata, batches of videos as arrays, grey videos, and the
processor's own helpers held to the library's (newest release)."""

import json

import numpy as np
import pytest
import torch
from conftest import tiny_processor, write_video
from transformers.video_utils import VideoMetadata

from pvc import PVCImageProcessor, PVCProcessor, PVCVideoProcessor
from pvc.image_processing_pvc import torchvision_loads


def stamped_frames(count, height=24, width=40):
    """Frames [count, H, W, 3] whose frame i shows its index as its grey level (i * 7 % 256)."""
    return np.stack([np.full((height, width, 3), index * 7 % 256, np.uint8) for index in range(count)])


def authors_rule(total, count, first=0):
    """InternVL2's `get_index` over frames first .. first + total - 1 (written out here, as in test_processing)."""
    segment = (total - 1) / count
    return [first + int(segment / 2 + np.round(segment * k)) for k in range(count)]


def settings(processor) -> dict:
    return {key: value for key, value in processor.to_dict().items() if key != "auto_map"}


def test_saved_as_a_video_processor_and_loaded_by_either_class(tmp_path):
    """`save_pretrained` writes video_preprocessor_config.json with the AutoVideoProcessor map; the processor saves
    it too (inside processor_config.json as well); both load it back, and AutoVideoProcessor does where torchvision
    loads (transformers' AutoVideoProcessor itself needs it)."""
    videos = PVCVideoProcessor(image_size=28, num_frames=5, video_max_tiles=2, fps=None)
    videos.save_pretrained(tmp_path / "alone")
    saved = json.loads((tmp_path / "alone" / "video_preprocessor_config.json").read_text())
    assert saved["video_processor_type"] == "PVCVideoProcessor" and saved["num_frames"] == 5
    assert saved["auto_map"]["AutoVideoProcessor"] == "video_processing_pvc.PVCVideoProcessor"
    assert "backend" not in saved and "_backend" not in saved
    loaded = PVCVideoProcessor.from_pretrained(tmp_path / "alone")
    assert settings(loaded) == settings(videos)
    processor = tiny_processor()
    processor.video_processor = videos
    processor.save_pretrained(tmp_path / "processor")
    nested = json.loads((tmp_path / "processor" / "processor_config.json").read_text())
    assert nested["video_processor"]["num_frames"] == 5
    again = PVCProcessor.from_pretrained(tmp_path / "processor", trust_remote_code=True)
    assert settings(again.video_processor) == settings(videos)
    if torchvision_loads():
        from transformers import AutoVideoProcessor

        auto = AutoVideoProcessor.from_pretrained(tmp_path / "processor", trust_remote_code=True)
        assert type(auto).__name__ == "PVCVideoProcessor" and auto.num_frames == 5 and auto.video_max_tiles == 2


def test_a_checkpoint_without_a_video_configuration_takes_the_image_processors_settings(tmp_path):
    processor = tiny_processor()
    processor.image_processor.num_frames = 7
    processor.save_pretrained(tmp_path)
    (tmp_path / "video_preprocessor_config.json").unlink()
    config = json.loads((tmp_path / "processor_config.json").read_text())
    del config["video_processor"]
    (tmp_path / "processor_config.json").write_text(json.dumps(config))
    loaded = PVCProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert loaded.video_processor.num_frames == 7 and loaded.video_processor.image_size == 56


def test_metadata_in_and_out_and_fps_from_metadata():
    """Frames in memory have no frame rate: fps (or start/end) without video_metadata is an error naming it (it was
    silently ignored); with metadata, a frame every 1/fps seconds; return_metadata gives the indices kept."""
    videos = PVCVideoProcessor(image_size=28, num_frames=4)
    frames = stamped_frames(30)
    out = videos(frames, return_metadata=True)
    (metadata,) = out["video_metadata"]
    assert isinstance(metadata, VideoMetadata) and metadata.total_num_frames == 30
    assert list(metadata.frames_indices) == authors_rule(30, 4)
    with pytest.raises(ValueError, match="video_metadata"):
        videos(frames, fps=2)
    with pytest.raises(ValueError, match="video_metadata"):
        videos(frames, start=1.0)
    timed = videos(frames, fps=2, video_metadata=VideoMetadata(total_num_frames=30, fps=10), return_metadata=True)
    assert list(timed["video_metadata"][0].frames_indices) == [int((k + 0.5) * 5) for k in range(6)]  # every 5th
    assert timed["video_num_frames"].tolist() == [6]
    window = videos(
        frames, start=1.0, end=2.0, video_metadata={"total_num_frames": 30, "fps": 10}, return_metadata=True
    )
    assert list(window["video_metadata"][0].frames_indices) == authors_rule(11, 4, first=10)
    with pytest.raises(ValueError, match="says 12 frames"):
        videos(frames, video_metadata=VideoMetadata(total_num_frames=12, fps=10))
    # sample_frames: transformers' signature, the authors' rule
    assert videos.sample_frames(VideoMetadata(total_num_frames=100, fps=25)).tolist() == authors_rule(100, 4)


def test_files_give_their_metadata(tmp_path):
    path = tmp_path / "clip.mp4"
    write_video(path, 40, fps=10)
    out = PVCVideoProcessor(image_size=28, num_frames=5)(str(path), return_metadata=True)
    (metadata,) = out["video_metadata"]
    assert metadata.total_num_frames == 40 and metadata.fps == pytest.approx(10)
    assert metadata.duration == pytest.approx(4) and list(metadata.frames_indices) == authors_rule(40, 5)
    assert (metadata.width, metadata.height) == (4 * 40 + 8, 32)
    videos, fetched = PVCVideoProcessor().fetch_videos([str(path)], sample_indices_fn=lambda metadata: [0, 39])
    assert videos[0].shape == (2, 32, 4 * 40 + 8, 3) and list(fetched[0].frames_indices) == [0, 39]


def test_batches_as_arrays_and_grey_videos():
    """[N, T, H, W, 3] is N videos; a grey video [T, H, W] is one video (its frames as RGB); a single picture
    [H, W, 3] given as a video is an error saying how to pass it."""
    videos = PVCVideoProcessor(image_size=28, num_frames=3)
    batch = np.stack([stamped_frames(6), stamped_frames(6)[::-1].copy()])
    out = videos(batch)
    assert out["video_num_frames"].tolist() == [3, 3]
    separately = torch.cat([videos(clip)["pixel_values_videos"] for clip in batch])
    assert torch.equal(out["pixel_values_videos"], separately)
    grey = stamped_frames(6)[..., 0]
    assert torch.equal(videos(grey)["pixel_values_videos"], videos(stamped_frames(6))["pixel_values_videos"])
    with pytest.raises(ValueError, match="one picture"):
        videos(stamped_frames(1)[0])


def test_do_sample_frames_false_keeps_given_frames_and_refuses_sampling_options():
    videos = PVCVideoProcessor(image_size=28, num_frames=3)
    out = videos(stamped_frames(5), do_sample_frames=False, return_metadata=True)
    assert out["video_num_frames"].tolist() == [5] and list(out["video_metadata"][0].frames_indices) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="num_frames"):
        videos(stamped_frames(5), do_sample_frames=False, num_frames=2)


def test_video_processor_pixels_equal_the_image_processors_frames():
    """The frames' tiles are the image processor's tiles of those frames (the same backend)."""
    frames = np.random.default_rng(0).integers(0, 256, (4, 40, 90, 3), dtype=np.uint8)
    for backend in ["pil", *(["torchvision"] if torchvision_loads() else [])]:
        videos = PVCVideoProcessor(image_size=28, num_frames=4, video_max_tiles=4, backend=backend)
        images = PVCImageProcessor(image_size=28, max_tiles=4, backend=backend)
        expected = images(images=list(frames))["pixel_values"]
        assert torch.equal(videos(frames)["pixel_values_videos"], expected), backend


def test_unknown_options_and_image_options_are_errors():
    videos = PVCVideoProcessor()
    with pytest.raises(TypeError, match="video_max_tiles"):
        videos(stamped_frames(4), max_tiles=2)
    with pytest.raises(TypeError, match="Unexpected arguments: \\['frames'\\]"):
        videos(stamped_frames(4), frames=2)
    with pytest.raises(TypeError, match="unknown settings"):
        PVCVideoProcessor(num_frame=3)


def test_processor_helpers_equal_the_librarys_on_the_newest_release():
    """Where transformers' ProcessorMixin (newest release) has the piece PVC writes for the 5.0 floor, the same inputs
    give the same outputs: placeholder replacement with its offsets, and assistant-mask index adjustment. (The
    library's `create_mm_token_type_ids` tells modalities by token id, and PVC's images and videos share
    <IMG_CONTEXT>: PVC's is held to it on single-modality batches.)"""
    from transformers import ProcessorMixin

    if not hasattr(ProcessorMixin, "get_text_with_replacements"):
        pytest.skip("this transformers release has no get_text_with_replacements (the floor)")
    from pvc.processing_pvc import _replaced, assistant_mask

    processor = tiny_processor(max_tiles=1)
    texts = ["<image> and <video> then <image>", "no media", "<video><image>"]
    images, videos = ["IMG-A", "IMG-B", "IMG-C"], ["VID-A", "VID-B"]
    library = processor.get_text_with_replacements(list(texts), images_replacements=images, videos_replacements=videos)
    order = iter(["IMG-A", "VID-A", "IMG-B", "VID-B", "IMG-C"])  # PVC takes them in text order
    ours = [_replaced(text, order) for text in texts]
    assert [text for text, _ in ours] == library[0]
    assert [offsets for _, offsets in ours] == library[1]

    image = np.zeros((56, 56, 3), np.uint8)
    conversation = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": "A grid."},
    ]
    out = processor.apply_chat_template(
        conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors=None
    )
    from transformers.utils.chat_template_utils import render_jinja_template

    _, spans = render_jinja_template(
        conversations=[conversation], chat_template=processor.chat_template, return_assistant_tokens_mask=True
    )
    text = processor.apply_chat_template(conversation)
    raw = processor(text=text, images=[image], return_offsets_mapping=True, return_text_replacement_offsets=True)
    mask = assistant_mask(raw["offset_mapping"][0], raw["text_replacement_offsets"][0], spans[0])
    adjusted = processor._adjust_assistant_masks_indices(
        {
            "input_ids": raw["input_ids"].tolist(),
            "offset_mapping": raw["offset_mapping"].tolist(),
            "text_replacement_offsets": raw["text_replacement_offsets"],
        },
        spans,
    )
    assert adjusted["assistant_masks"][0] == mask == out["assistant_masks"][0] and sum(mask) > 0

    context = processor.token_id("<IMG_CONTEXT>")
    for kind, given in (("image", {"images": [image]}), ("video", {"videos": [np.stack([image] * 4)]})):
        inputs = processor(text=f"<{kind}> hi", **given, return_mm_token_type_ids=True)

        class Ids:  # what the library's create_mm_token_type_ids reads
            image_token_ids = [context] if kind == "image" else []
            video_token_ids = [context] if kind == "video" else []
            audio_token_ids = []

        library_types = ProcessorMixin.create_mm_token_type_ids(Ids(), inputs["input_ids"].tolist())
        assert inputs["mm_token_type_ids"].tolist() == library_types, kind


def test_load_time_options_and_backend_reach_the_video_processor(tmp_path):
    """from_pretrained(num_frames=, fps=, max_frames=, video_max_tiles=) set the video processor's settings (they
    were given to the image processor, whose video settings nothing reads); backend= sets both processors' and not
    the tokenizer's."""
    tiny_processor().save_pretrained(tmp_path)
    loaded = PVCProcessor.from_pretrained(
        tmp_path, trust_remote_code=True, num_frames=8, max_frames=6, video_max_tiles=2, backend="pil"
    )
    videos = loaded.video_processor
    assert (videos.num_frames, videos.max_frames, videos.video_max_tiles) == (8, 6, 2)
    assert loaded.image_processor.backend == videos.backend == "pil"
    assert getattr(loaded.tokenizer, "backend", None) != "pil"
    assert loaded(text="<video>", videos=[stamped_frames(20)])["video_num_frames"].tolist() == [6]


def test_token_counts_follow_the_frames_the_processor_keeps():
    """_get_num_multimodal_tokens (what vLLM sizes with) counts max_frames and fps as the video processor samples."""
    processor = tiny_processor(max_tiles=1)
    processor.video_processor.max_frames = 3
    for options in ({}, {"num_frames": 2}, {"max_frames": 2}):
        counted = processor._get_num_multimodal_tokens(video_sizes=[(20, 28, 28)], **options)["num_video_tokens"][0]
        made = processor(text="<video>", videos=[stamped_frames(20, 28, 28)], **options)["input_ids"]
        assert counted == int((made == processor.token_id("<IMG_CONTEXT>")).sum()), options
    with pytest.raises(ValueError, match="video_metadata"):
        processor._get_num_multimodal_tokens(video_sizes=[(20, 28, 28)], fps=2)


def test_call_options_win_over_saved_settings():
    """A frame count asked for in a call wins over a saved fps; min_tiles and use_thumbnail in a call are honoured;
    size and video_max_tiles that disagree are an error naming both."""
    videos = PVCVideoProcessor(image_size=28, fps=5)
    metadata = VideoMetadata(total_num_frames=30, fps=25)
    picked = videos(stamped_frames(30), num_frames=3, video_metadata=metadata, return_metadata=True)
    assert list(picked["video_metadata"][0].frames_indices) == authors_rule(30, 3)
    wide = np.zeros((2, 28, 56, 3), np.uint8)
    assert videos(wide, num_frames=2, video_max_tiles=2)["video_num_tiles"].tolist() == [3]
    assert videos(wide, num_frames=2, video_max_tiles=2, use_thumbnail=False)["video_num_tiles"].tolist() == [2]
    with pytest.raises(ValueError, match="video_max_tiles=2: give one"):
        videos(wide, size={"height": 56, "width": 56}, video_max_tiles=2)
    with pytest.raises(ValueError, match="video_max_tiles=2: give one"):
        PVCVideoProcessor(image_size=28, size={"height": 56, "width": 56}, video_max_tiles=2)


def test_metadata_of_sampled_frames_numpy_numbers_and_empty_inputs():
    """Frames with transformers' load_video metadata (frames_indices as many as the frames, total_num_frames the
    source's) are accepted, and keys no VideoMetadata has are left out; numpy numbers are numbers; no video, or a
    video of no frames, is an error saying so."""
    videos = PVCVideoProcessor(image_size=28, num_frames=4)
    sampled = {"total_num_frames": 300, "fps": 30, "frames_indices": list(range(0, 300, 38)), "do_sample_frames": True}
    out = videos(stamped_frames(8), video_metadata=sampled, return_metadata=True)
    assert out["video_num_frames"].tolist() == [4] and list(out["video_metadata"][0].frames_indices) == authors_rule(
        8, 4
    )
    with pytest.raises(ValueError, match="says 12 frames.*frames_indices"):
        videos(stamped_frames(8), video_metadata={"total_num_frames": 12})
    assert videos(stamped_frames(8), num_frames=np.int64(2))["video_num_frames"].tolist() == [2]
    window = videos(
        stamped_frames(30), start=1, end=np.float32(2.0), video_metadata={"total_num_frames": 30, "fps": 10}
    )
    assert window["video_num_frames"].tolist() == [4]
    processor = tiny_processor()
    assert processor(
        text="<video>",
        videos=[stamped_frames(30)],
        start=1,
        end=2,
        video_metadata=[{"total_num_frames": 30, "fps": 10}],
    )
    with pytest.raises(ValueError, match="No video was given"):
        videos([])
    with pytest.raises(ValueError, match="has no frames"):
        videos(np.zeros((0, 8, 8, 3), np.uint8))
