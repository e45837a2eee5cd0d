"""Frames of a video: which to keep (InternVL2's and PVC's sampling rule) and decoding only those with PyAV.

`read_video` opens a file, an http(s) URL or a base64 data: URL, reads the packets' timestamps without decoding,
maps the sampling rule's instants to the frames nearest in time and decodes just those, seeking to far-apart ones;
frames come upright by the container's display matrix. PyAV is imported only when a video file is read, so the
image half of PVC needs no video library.
"""

import base64
import binascii
import bisect
import functools
import io
import itertools
import logging
import math
import os

import numpy as np
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

# Seek instead of decoding forward when the next wanted frame lies this many frames ahead or more.
SEEK_DISTANCE = 32


def check_sampling(num_frames, fps, max_frames, start, end):
    """Frame-sampling options, checked before any video is opened."""
    if num_frames is not None and (isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1):
        raise ValueError(f"num_frames must be a whole number of frames, at least 1; got {num_frames!r}.")
    if fps is not None and not (isinstance(fps, (int, float)) and fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be a positive number of frames per second; got {fps!r}.")
    if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1):
        raise ValueError(f"max_frames must be a whole number of frames, at least 1; got {max_frames!r}.")
    for name, value in (("start", start), ("end", end)):
        if value is not None and not (isinstance(value, (int, float)) and value >= 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a time in seconds, 0 or more; got {value!r}.")
    if start is not None and end is not None and end < start:
        raise ValueError(f"end ({end} s) must not come before start ({start} s).")


def sample_indices(total: int, num_frames: int | None, fps: float | None, native_fps: float | None, max_frames):
    """Indices of the frames to keep among `total` (see `PVCImageProcessor.sample_frames`)."""
    if total < 1:
        raise ValueError("The video has no decodable frames.")
    if fps is not None:
        if native_fps is None:
            raise ValueError("fps sampling needs the video's own frame rate (a video file).")
        # A frame every native_fps / fps source frames; never more often than the video has frames.
        step = max(1.0, native_fps / fps)
        count = max(1, math.floor(total / step))
        if max_frames is None or count <= max_frames:
            return [min(total - 1, math.floor((k + 0.5) * step)) for k in range(count)]
        num_frames = max_frames
    elif max_frames is not None:
        num_frames = min(num_frames, max_frames)
    if num_frames >= total:
        # The authors' rule below is for sparse sampling: asked for every frame (or more) it picks some twice and
        # never the last (30 of 30 frames: frame 14 twice, no frame 29). Here each frame comes once, in order, and
        # asking for more frames than there are repeats them evenly.
        if num_frames > total:
            logger.debug("The video has %d frames, fewer than the %d requested: frames repeat.", total, num_frames)
        return [k * total // num_frames for k in range(num_frames)]
    # The rule of the authors' `load_video` (the paper is silent): segments of the span from the first to the last
    # frame, rounded as there (`round` halves to even, as numpy's). With fewer frames than the video has, it picks
    # distinct frames, the first segment's middle first; the last frame only when the segments are short.
    segment = (total - 1) / num_frames
    return [int(segment / 2 + round(segment * k)) for k in range(num_frames)]


def read_video(path: str, num_frames, fps=None, max_frames=None, start=None, end=None) -> list[Image.Image]:
    """Decode only the sampled frames of a video file (or http(s) URL, read by ranges) with PyAV, seeking to
    far-apart frames.

    The packets' timestamps are read first (without decoding, as decord does when it opens a file): they give the
    exact frame count, and each sampling rule's instants are mapped to the frame nearest in time. For a constant
    frame rate that is frame index i for instant i / rate, so the picks are the authors'; for a variable frame rate
    the picks are spread evenly in time, not in frame count (a slow-motion or screen-recorded stretch holds many
    more frames per second than the rest)."""
    try:
        import av
    except ImportError:
        raise ImportError("Reading video files needs PyAV: pip install av") from None
    is_url = path.startswith(("http://", "https://"))
    source = path
    if path.startswith("data:"):  # a data URL: data:video/mp4;base64,....
        source, path = io.BytesIO(_data_url_bytes(path)), path[:40] + "..."
    elif not is_url and not os.path.exists(path):
        raise ValueError(f"Video file not found: {path}")
    try:
        with av.open(source) as container:
            form = container.format.name
            if form == "image2" or form.endswith("_pipe"):  # FFmpeg's readers of single pictures
                raise ValueError(
                    f"{path} is a picture ({form}), not a video: pass it as an image, or several frame files as a "
                    "list, which is one video."
                )
            if not container.streams.video:
                kinds = ", ".join(stream.type for stream in container.streams) or "none"
                raise ValueError(
                    f"{path} holds no video stream (container {form}, streams: {kinds}): it is damaged or not a video."
                )
            stream = container.streams.video[0]
            times = _presentation_times(container, stream)
            show = functools.partial(_upright, rotate_tag=_rotate_tag(stream))
            if times:
                positions = _sample_by_time(times, stream.time_base, num_frames, fps, max_frames, start, end, path)
                frames = _decode_at(container, stream, times, positions, show)
        if not times:
            # No timestamps: a raw elementary stream (.h264, .hevc), which cannot seek either. Count its frames by
            # decoding, then decode again from the start, taking frames by position at the nominal rate.
            if isinstance(source, io.BytesIO):
                source.seek(0)
            with av.open(source) as container:
                stream = container.streams.video[0]
                rate = float(stream.average_rate or stream.guessed_rate or 0)
                total = sum(1 for _ in container.decode(stream))
            first, last = _window(total, start, end, rate, path)
            indices = sample_indices(last - first + 1, num_frames, fps, rate, max_frames)
            if isinstance(source, io.BytesIO):
                source.seek(0)
            with av.open(source) as container:
                frames = _decode_in_order(
                    container.decode(container.streams.video[0]), [first + i for i in indices], show
                )
    except av.error.FFmpegError as error:
        hint = "Is the URL reachable?" if is_url else "The file is damaged or not a video."
        raise ValueError(f"Could not read the video {path}: {error}. {hint}") from None
    if not frames:
        raise ValueError(f"The video {path} has no decodable frames: it is damaged or cut short.")
    return frames


def _data_url_bytes(url: str) -> bytes:
    header, _, payload = url.partition(",")
    if not header.endswith(";base64"):
        raise ValueError(f"Only base64 data URLs are read (data:<type>;base64,...); got {url[:40]}...")
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error as error:
        raise ValueError(f"The data URL's base64 payload cannot be decoded: {error}") from None


def _presentation_times(container, stream) -> list[int]:
    """Every frame's presentation timestamp (in the stream's time base), in display order, read from the packets
    without decoding; empty when the packets carry none. (Decoding then starts with a seek, `_seek_before`.)"""
    stamps = {
        packet.pts
        for packet in container.demux(stream)
        if packet.pts is not None and packet.size and not getattr(packet, "is_discard", False)
    }
    return sorted(stamps)


def _window(total: int, start, end, rate: float, path) -> tuple[int, int]:
    """First and last frame (inclusive, as `load_video`) of the start/end window at a constant rate."""
    first = 0 if start is None else max(0, round(start * rate))
    last = total - 1 if end is None else min(total - 1, round(end * rate))
    if last < first:
        raise ValueError(f"The window [{start}, {end}] s holds no frame of {path} ({total} frames).")
    return first, last


def _sample_by_time(times, time_base, num_frames, fps, max_frames, start, end, path) -> list[int]:
    """Positions (in `times`) of the frames to decode: the sampling rule's instants, each the nearest frame."""
    seconds = [float((stamp - times[0]) * time_base) for stamp in times]

    def nearest(instant: float) -> int:  # ties go to the earlier frame
        after = bisect.bisect_left(seconds, instant)
        if after == len(seconds) or (after > 0 and instant - seconds[after - 1] <= seconds[after] - instant):
            return after - 1
        return after

    first = 0 if start is None else nearest(start)
    last = len(times) - 1 if end is None else nearest(end)
    if last < first or (start is not None and start > seconds[-1]):
        raise ValueError(f"The window [{start}, {end}] s holds no frame of {path} ({len(times)} frames).")
    # The rules pick among `count` evenly spaced instants from the first to the last frame of the window; at a
    # constant rate these instants are the frames' own.
    count, span = last - first + 1, seconds[last] - seconds[first]
    indices = sample_indices(count, num_frames, fps, (count - 1) / span if span else 1.0, max_frames)
    if len(indices) >= count:
        return [first + index for index in indices]  # every frame once (or evenly repeated), by position
    positions = [nearest(seconds[first] + span * index / (count - 1)) for index in indices]
    # With fps, each frame at most once (a variable rate may put two instants nearest to one frame)
    return list(dict.fromkeys(positions)) if fps is not None else positions


def _decode_at(container, stream, times: list[int], positions: list[int], show) -> list[Image.Image]:
    """Frames at the given (sorted, possibly repeated) positions in `times`, as `show` turns them into images.
    Far-apart frames are reached by seeking; a frame past the real end becomes the last one."""
    wanted = sorted(set(positions))
    found: dict[int, Image.Image] = {}
    decoder, position, last = None, -1, None
    for target in wanted:
        if decoder is None or target - position >= SEEK_DISTANCE:
            decoder, position = _seek_before(container, stream, times, target)
        for frame in decoder:
            position = position + 1 if frame.pts is None else bisect.bisect_left(times, frame.pts)
            last = frame
            if position >= target:
                found[target] = show(frame)
                break
        else:  # the stream ended before the target
            if last is None:
                break
            found[target] = show(last)
    return [found[index] for index in positions if index in found]


def _decode_in_order(decoder, indices: list[int], show) -> list[Image.Image]:
    """Frames at the given (sorted, possibly repeated) indices, counting frames from the start."""
    wanted, found, last = set(indices), {}, None
    for index, frame in enumerate(decoder):
        last = frame
        if index in wanted:
            found[index] = show(frame)
            if len(found) == len(wanted):
                break
    if last is None:
        return []
    return [found[index] if index in found else show(last) for index in indices]


def _upright(frame, rotate_tag: float = 0) -> Image.Image:
    """A decoded frame as a viewer shows it: turned and mirrored by its display matrix (a phone held upright
    records its frames sideways and says so there; a front camera may mirror them), as ffmpeg's player does and as
    images are by their EXIF orientation. Without a matrix, turned by the legacy `rotate` tag (clockwise degrees)."""
    image = frame.to_image()
    matrix = _display_matrix(frame)
    if matrix is None:
        return image.rotate(-rotate_tag, expand=True) if round(rotate_tag) % 360 else image
    # The matrix's 2x2 part is a rotation R(theta) = [[cos, -sin], [sin, cos]], its first column negated when the
    # picture is mirrored (a negative determinant); a mirror of both axes is the rotation by 180 degrees.
    a, b, c, d = matrix
    mirrored = a * d - b * c < 0
    degrees = math.degrees(math.atan2(-b, d) if mirrored else math.atan2(c, a))  # counter-clockwise, as PIL's
    if round(degrees) % 360:
        image = image.rotate(degrees, expand=True)
    return ImageOps.mirror(image) if mirrored else image


def _display_matrix(frame) -> tuple[float, float, float, float] | None:
    """The a, b, c, d entries of a frame's display matrix (FFmpeg's 16.16 fixed-point layout), or None."""
    try:
        side_data = list(frame.side_data)
    except (AttributeError, TypeError):
        return None
    for data in side_data:
        kind = getattr(data, "type", None)
        if str(getattr(kind, "name", kind)).upper().endswith("DISPLAYMATRIX"):
            values = np.frombuffer(bytes(data), dtype="<i4")
            if values.size == 9:
                return tuple(float(value) / 65536 for value in values[[0, 1, 3, 4]])
    return None


def _rotate_tag(stream) -> float:
    """The legacy `rotate` metadata tag (clockwise degrees; Matroska files keep it as ROTATE), or 0."""
    tags = {key.lower(): value for key, value in (stream.metadata or {}).items()}
    try:
        return float(tags.get("rotate", 0))
    except ValueError:
        return 0.0


def _seek_before(container, stream, times, target):
    """A decoder whose first frame is at or before position `target`, and the position before that frame. Some
    containers (MPEG-TS) land after the time asked for; then it seeks further back, down to the start if need be."""
    back = 0
    while True:
        goal = max(0, target - back)
        # The very start is asked for as time 0 or earlier: MPEG-TS lands a keyframe late when asked for its start.
        container.seek(times[goal] if goal else min(0, times[0]), stream=stream, backward=True)
        decoder = container.decode(stream)
        first = next(decoder, None)
        if first is None:
            return iter(()), -1
        first_position = goal if first.pts is None else bisect.bisect_left(times, first.pts)
        if first_position <= target or goal == 0:
            return itertools.chain([first], decoder), first_position - 1
        back = max(SEEK_DISTANCE, 2 * back)


__all__ = ["check_sampling", "read_video", "sample_indices"]
