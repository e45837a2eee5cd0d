"""Video decoding (video_decoding_pvc.py) against videos whose every frame carries its own index in its pixels.

Each test video shows, in frame i, the bits of i as a 4 x 4 grid of black and white blocks, so a test reads back
which frame it got. The frames expected are computed here, by the authors' sampling rule written out independently
of the code under test (InternVL2's and PVC's `load_video`), and the decoding cost is held to the floor computed
here from the keyframes the file's packets mark.
"""

import contextlib
import functools
import http.server
import logging
import re
import threading
import weakref

import numpy as np
import pytest
from PIL import Image

from pvc import PVCImageProcessor, PVCVideoProcessor

av = pytest.importorskip("av")

SIDE, BLOCK = 64, 16  # 64 x 64 frames, 16 blocks of 16 x 16 pixels: indices up to 65535


def stamp(index: int) -> np.ndarray:
    """Frame `index` as an RGB array: bit k of the index is block k (row by row), white for 1."""
    array = np.zeros((SIDE, SIDE, 3), np.uint8)
    for bit in range(16):
        if index >> bit & 1:
            row, column = divmod(bit, 4)
            array[row * BLOCK : (row + 1) * BLOCK, column * BLOCK : (column + 1) * BLOCK] = 255
    return array


def read_stamp(frame) -> int:
    """The index a frame (PIL image or array) shows."""
    grey = np.asarray(frame.convert("L") if isinstance(frame, Image.Image) else frame, np.float32)
    assert grey.shape[:2] == (SIDE, SIDE), grey.shape
    blocks = grey.reshape(4, BLOCK, 4, BLOCK).mean(axis=(1, 3)).ravel()
    assert np.all((blocks < 64) | (blocks > 192)), f"not a clean stamp: {blocks.round()}"  # codec noise only
    return sum(1 << bit for bit in range(16) if blocks[bit] > 128)


def indices(frames) -> list[int]:
    return [read_stamp(frame) for frame in frames]


# container suffix, codec, encoder options for a keyframe every `gop` frames (and B-frames where the codec has them)
def x264(gop):
    return {"x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes=2", "preset": "ultrafast"}


def vpx(gop):
    return {"g": str(gop), "keyint_min": str(gop), "auto-alt-ref": "0", "deadline": "realtime", "cpu-used": "8"}


def gop_size(gop):
    return {"g": str(gop), "bf": "2"}


FORMATS = {
    "mp4 (H.264, B-frames)": ("mp4", "libx264", x264),
    "mov (H.264, B-frames)": ("mov", "libx264", x264),
    "mkv (H.264, B-frames)": ("mkv", "libx264", x264),
    "webm (VP9)": ("webm", "libvpx-vp9", vpx),
    "avi (MPEG-4 part 2, B-frames)": ("avi", "mpeg4", gop_size),
    "MPEG-TS (H.264, B-frames)": ("ts", "libx264", x264),
    "MPEG-TS (MPEG-2, B-frames)": ("ts", "mpeg2video", gop_size),
    "MPEG-PS (MPEG-2, B-frames)": ("mpg", "mpeg2video", gop_size),
    # the index (moov) before the frames, as web videos are written: a cut file's index lists frames it lacks
    "mp4, index first (H.264, B-frames)": ("mp4", "libx264", x264, {"movflags": "faststart"}),
}
TOTAL, RATE = 300, 25  # 12 s
SINGLE = 100_000  # a keyframe spacing longer than the video: one keyframe


def write_stamped(path, suffix_codec_options, gop, total=TOTAL, rate=RATE, shift=None):
    """Frames 0 .. total - 1 stamped, in the container and codec given; `shift(index)`: ticks (of 1 / rate) added to
    the packets' presentation times (decoding times unchanged)."""
    _, codec, options, *muxer_options = suffix_codec_options
    with av.open(str(path), "w", options=muxer_options[0] if muxer_options else None) as container:
        stream = container.add_stream(codec, rate=rate, options=options(gop))
        stream.width = stream.height = SIDE
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = min(gop, 600)  # options decide where they apply; the context otherwise
        stream.codec_context.bit_rate = 2_000_000
        packets = []
        for index in range(total):
            packets += stream.encode(av.VideoFrame.from_ndarray(stamp(index), format="rgb24"))
        packets += stream.encode()
        for packet in packets:
            if shift is not None:
                packet.pts += shift(round(packet.pts * packet.time_base * rate))
            container.mux(packet)
    return path


def authors_rule(total: int, count: int) -> list[int]:
    """InternVL2's `get_index` with no time bound: frames 0 .. total - 1 cut into `count` segments of length
    (total - 1) / count, the frame at each segment's middle (numpy's rounding)."""
    segment = (total - 1) / count
    return [int(segment / 2 + np.round(segment * k)) for k in range(count)]


def keyframe_positions(path) -> list[int]:
    """Display positions of the frames the packets mark as keyframes, read here with plain PyAV."""
    with av.open(str(path)) as container:
        packets = [(p.pts, p.is_keyframe) for p in container.demux(video=0) if p.pts is not None and p.size]
    order = sorted(pts for pts, _ in packets)
    return sorted(order.index(pts) for pts, key in packets if key)


def floor_cost(keyframes: list[int], picks: list[int]) -> int:
    """Frames decoded when each group of pictures holding a pick is decoded from its keyframe to its last pick."""
    last_pick = {}
    for pick in picks:
        keyframe = max(k for k in keyframes if k <= pick)
        last_pick[keyframe] = max(pick, last_pick.get(keyframe, pick))
    return sum(last - keyframe + 1 for keyframe, last in last_pick.items())


def decoded_count(caplog) -> int:
    counts = [int(m.group(1)) for r in caplog.records if (m := re.match(r"Decoded (\d+) frames", r.getMessage()))]
    assert len(counts) == 1, counts
    return counts[0]


@pytest.fixture(scope="module")
def stamped(tmp_path_factory):
    """One file per (format, keyframe spacing), written once for the module."""
    folder, made = tmp_path_factory.mktemp("stamped"), {}

    def get(name, gop):
        if (name, gop) not in made:
            suffix = FORMATS[name][0]
            made[name, gop] = write_stamped(folder / f"{len(made)}.{suffix}", FORMATS[name], gop)
        return made[name, gop]

    return get


@pytest.mark.parametrize("gop", [50, SINGLE], ids=["keyframe every 2 s", "one keyframe"])
@pytest.mark.parametrize("name", list(FORMATS))
def test_every_sampled_frame_is_the_one_the_rule_names(stamped, name, gop, caplog):
    """In every container, with B-frames, regular or a single keyframe: the frames decoded are the authors' picks
    (on MPEG-TS, picks after the last keyframe used to come back as the frame before it), and decoding costs no more
    than one linear decode and at most 1.3x the groups of pictures that hold the picks."""
    path = stamped(name, gop)
    processor = PVCImageProcessor(image_size=SIDE)
    keyframes = keyframe_positions(path)
    assert keyframes[0] == 0 and (len(keyframes) == 1 if gop == SINGLE else len(keyframes) >= TOTAL // gop)
    for count in (5, 16, 64):
        with caplog.at_level(logging.DEBUG, logger="pvc.video_decoding_pvc"):
            caplog.clear()
            frames = processor.sample_frames(str(path), count)
        picks = authors_rule(TOTAL, count)
        assert indices(frames) == picks, (name, count)
        decoded = decoded_count(caplog)
        assert decoded <= TOTAL, (name, count, decoded)
        if not name.startswith("MPEG-PS"):  # its muxer repeats timestamps: read in one pass, without seeking
            assert decoded <= 1.3 * floor_cost(keyframes, picks), (name, count, decoded)
    # as many frames as the video has: each once, in order
    assert indices(processor.sample_frames(str(path), TOTAL)) == list(range(TOTAL))


@pytest.mark.parametrize(
    "name",
    [
        "mkv (H.264, B-frames)",
        "MPEG-TS (H.264, B-frames)",
        "MPEG-TS (MPEG-2, B-frames)",
        "mp4, index first (H.264, B-frames)",
    ],
)
def test_a_cut_file_gives_its_last_real_frame_only_past_its_end(stamped, tmp_path, name, caplog):
    """A file cut short (a download broken off) is read as far as it goes: the picks are among the frames its packets
    list, in display order, and only a pick past the last frame that decodes is that frame (with a warning)."""
    data = stamped(name, 50).read_bytes()
    cut = tmp_path / f"cut.{FORMATS[name][0]}"
    cut.write_bytes(data[: int(len(data) * 0.7)])
    with av.open(str(cut)) as container:  # what the cut file holds, read here with plain PyAV
        listed = sorted(p.pts for p in container.demux(video=0) if p.pts is not None and p.size)
    decodable = {}
    with av.open(str(cut)) as container, contextlib.suppress(av.error.InvalidDataError):  # (an MP4's cut packet)
        for frame in container.decode(video=0):
            decodable[frame.pts] = read_stamp(frame.to_image())
    last = decodable[max(decodable)]
    assert 0 < len(decodable) <= len(listed) < TOTAL and last < TOTAL - 1
    # The frames just before the cut may be missing (B-frames whose packets were cut off), so the frames listed are
    # not evenly spaced: the picks are the rule's instants, evenly in time, each the listed frame nearest to it.
    span = listed[-1] - listed[0]
    for count in (5, 16, 40):
        instants = [listed[0] + span * index / (len(listed) - 1) for index in authors_rule(len(listed), count)]
        nearest = [min(listed, key=lambda pts: (abs(pts - instant), pts)) for instant in instants]
        with caplog.at_level(logging.WARNING):
            picked = indices(PVCImageProcessor(image_size=SIDE).sample_frames(str(cut), count))
        assert picked == [decodable.get(pts, last) for pts in nearest], count


def nearest_in_time(listed: list, count: int) -> list[int]:
    """Positions among the presentation times `listed` (sorted) nearest to the authors' picks spread evenly in time
    from the first to the last (ties to the earlier)."""
    span = listed[-1] - listed[0]
    instants = [listed[0] + span * index / (len(listed) - 1) for index in authors_rule(len(listed), count)]
    return [
        min(range(len(listed)), key=lambda position: (abs(listed[position] - instant), position))
        for instant in instants
    ]


@pytest.mark.parametrize("gop", [50, SINGLE], ids=["keyframe every 2 s", "one keyframe"])
@pytest.mark.skipif(
    not hasattr(av.stream.Stream, "index_entries"), reason="PyAV exposes a stream's index from version 17"
)
def test_mp4_and_mov_frames_come_from_their_index_not_their_packets(stamped, gop, monkeypatch):
    """An MP4/MOV file lists every frame when it is opened: its packets are not read one by one to count the frames
    and find the keyframes (an hour at 30 fps is 108,000 packets, 0.5 s of Python at 360p, where decoding 16 picks
    takes 0.1 s). Other containers list no such index and are counted from their packets."""
    from pvc import video_decoding_pvc

    def packet_pass(*args):
        raise AssertionError("the packet pass ran")

    monkeypatch.setattr(video_decoding_pvc, "_index", packet_pass)
    processor = PVCImageProcessor(image_size=SIDE)
    for name in ("mp4 (H.264, B-frames)", "mov (H.264, B-frames)", "mp4, index first (H.264, B-frames)"):
        for count in (5, 16, 64):
            assert indices(processor.sample_frames(str(stamped(name, gop)), count)) == authors_rule(TOTAL, count)
    with pytest.raises(AssertionError, match="the packet pass ran"):
        processor.sample_frames(str(stamped("mkv (H.264, B-frames)", gop)), 5)


MISLEADING = {
    # keyframes shown after the B-frames decoded after them (which refer to the group before)
    "open groups of pictures": (
        ("mp4", "libx264", lambda gop: {**x264(gop), "x264-params": x264(gop)["x264-params"] + ":open-gop=1"}),
        100,
        None,
    ),
    # decoding times at one step, but the frames from 150 on are shown one frame later (a gap, as after joining two
    # encodes whose delays differ); with one keyframe no seek lands off the grid, only the file's last packets show it
    "a gap in the shown times": (("mp4", "libx264", x264), SINGLE, lambda index: int(index >= 150)),
    # frames 100 .. 199 shown one frame later, then on time again (frames 199 and 200 shown at one time): the first
    # and last packets are on the grid; decoding through frame 100 finds a frame that is not the next one listed
    "a stretch shown later": (("mp4", "libx264", x264), SINGLE, lambda index: int(100 <= index < 200)),
}


@pytest.mark.parametrize("case", list(MISLEADING))
def test_an_mp4_whose_index_would_mislead_is_read_by_its_packets(tmp_path, case):
    """The index lists decoding times; frames are placed by the times they are shown. Where the two are not one grid
    apart, the frames are the ones the packets' times name, as for any other container."""
    form, gop, shift = MISLEADING[case]
    path = write_stamped(tmp_path / "video.mp4", form, gop, shift=shift)
    with av.open(str(path)) as container:  # the shown times, read here with plain PyAV
        listed = sorted(p.pts for p in container.demux(video=0) if p.pts is not None and p.size)
    assert len(listed) == TOTAL
    processor = PVCImageProcessor(image_size=SIDE)
    for count in (5, 16, 64):
        # a time shown twice: the frames are taken by position, as their packets count them (as for MPEG-PS)
        expected = authors_rule(TOTAL, count) if len(set(listed)) < TOTAL else nearest_in_time(listed, count)
        assert indices(processor.sample_frames(str(path), count)) == expected, (case, count)


def test_a_video_url_is_transferred_once(stamped):
    """An http(s) URL is downloaded once, whole (one request, the file's bytes once), then read as a file; a dead
    URL is an error naming it."""
    path = stamped("mp4 (H.264, B-frames)", 50)
    served = []

    class Counting(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def copyfile(self, source, destination):
            data = source.read()
            served.append(len(data))
            destination.write(data)

    handler = functools.partial(Counting, directory=path.parent)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/{path.name}"
    try:
        assert indices(PVCImageProcessor(image_size=SIDE).sample_frames(url, 16)) == authors_rule(TOTAL, 16)
        with pytest.raises(ValueError, match=re.escape(f"Could not fetch the video {url[:-4]}.nope: HTTP 404")):
            PVCImageProcessor(image_size=SIDE).sample_frames(url[:-4] + ".nope", 4)
    finally:
        server.shutdown()
        server.server_close()
    assert served == [path.stat().st_size]
    with pytest.raises(ValueError, match="Is the URL reachable"):
        PVCImageProcessor(image_size=SIDE).sample_frames(url, 4)


def test_full_resolution_frames_are_not_kept(stamped, monkeypatch):
    """Through the processor, each frame is tiled as it is decoded: when a frame reaches the tiling, no earlier
    decoded frame is still alive (64 frames of a 1080p file took 1.56 GB when all were kept at full size)."""
    path = stamped("mp4 (H.264, B-frames)", 50)
    processor = PVCVideoProcessor(image_size=32)
    alive, seen = [], []
    original = PVCImageProcessor.load

    def loading(self, frame, **options):  # each decoded frame, on its way to the tiling
        alive.append(sum(1 for ref in seen if ref() is not None))
        seen.append(weakref.ref(frame))
        return original(self, frame, **options)

    monkeypatch.setattr(PVCImageProcessor, "load", loading)
    out = processor(videos=str(path), num_frames=16)
    assert out["video_num_frames"].tolist() == [16] and len(seen) == 16
    assert max(alive) == 0, alive
    # the pixels are those of the frames sampled as pictures
    monkeypatch.undo()
    frames = PVCImageProcessor(image_size=32).sample_frames(str(path), 16)
    expected = processor(videos=[[np.asarray(frame) for frame in frames]], num_frames=16)["pixel_values_videos"]
    assert np.array_equal(out["pixel_values_videos"].numpy(), expected.numpy())


def test_videos_that_cannot_work_are_errors_naming_the_file(tmp_path, stamped):
    """An empty file, a file without a video stream and a stream whose frames do not decode: each a ValueError that
    names the file and says what is wrong."""
    processor = PVCImageProcessor(image_size=SIDE)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(f"The video file {empty} is empty (0 bytes)")):
        processor.sample_frames(str(empty), 4)
    sound = tmp_path / "sound.mka"
    with av.open(str(sound), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    with pytest.raises(ValueError, match=re.escape(f"{sound} holds no video stream")):
        processor.sample_frames(str(sound), 4)
    # the packets are there, their data is not: every byte after the headers of a TS file zeroed
    data = bytearray(stamped("MPEG-TS (H.264, B-frames)", 50).read_bytes())
    for offset in range(0, len(data), 188):  # keep each 4-byte TS packet header, zero its payload
        data[offset + 4 : offset + 188] = bytes(184)
    broken = tmp_path / "broken.ts"
    broken.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=re.escape(str(broken))):
        processor.sample_frames(str(broken), 4)


def test_time_windows_of_a_constant_rate_file_are_the_authors_frames(stamped):
    """start/end select frames round(start * rate) .. round(end * rate), as the authors' `get_index(bound)` does
    (Python's rounding, half to even), the same frames `PVCVideoProcessor.sample_frames` names without decoding."""
    path = stamped("mp4 (H.264, B-frames)", 50)
    processor = PVCImageProcessor(image_size=SIDE)
    videos = PVCVideoProcessor(image_size=SIDE)
    metadata = {"total_num_frames": TOTAL, "fps": RATE}
    for start, end, count in ((0.3, 2.5, 4), (0.3, None, 4), (1.02, 3.1, 5), (None, 0.7, 3), (2.0, 2.06, 2)):
        first = 0 if start is None else round(start * RATE)
        last = TOTAL - 1 if end is None else min(TOTAL - 1, round(end * RATE))
        expected = [first + index for index in authors_rule(last - first + 1, count)]
        assert indices(processor.sample_frames(str(path), count, start=start, end=end)) == expected, (start, end)
        named = videos.sample_frames(metadata, num_frames=count, start=start, end=end).tolist()
        assert named == expected, (start, end)
