"""Frames of a video: which to keep (InternVL2's and PVC's sampling rule) and decoding only those with PyAV.

`read_video` opens a file, an http(s) URL (downloaded once) or a base64 data: URL, reads the frames' timestamps and
keyframes without decoding (from an MP4/MOV file's index, else from the packets), maps the sampling rule's instants to
the frames nearest in time and decodes in one forward pass, seeking only over groups of pictures that hold no pick; frames come upright by the container's display
matrix. PyAV is imported only when a video file is read, so the
image half of PVC needs no video library.
"""

import base64
import binascii
import bisect
import contextlib
import functools
import io
import itertools
import logging
import math
import numbers
import os
import tempfile

import numpy as np
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)


def check_sampling(num_frames, fps, max_frames, start, end):
    """Frame-sampling options, checked before any video is opened."""
    # numpy's integers and floats count as numbers (numbers.Integral / Real); booleans do not
    if num_frames is not None and not (_whole(num_frames) and num_frames >= 1):
        raise ValueError(f"num_frames must be a whole number of frames, at least 1; got {num_frames!r}.")
    if fps is not None and not (_real(fps) and fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be a positive number of frames per second; got {fps!r}.")
    if max_frames is not None and not (_whole(max_frames) and max_frames >= 1):
        raise ValueError(f"max_frames must be a whole number of frames, at least 1; got {max_frames!r}.")
    for name, value in (("start", start), ("end", end)):
        if value is not None and not (_real(value) and value >= 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a time in seconds, 0 or more; got {value!r}.")
    if start is not None and end is not None and end < start:
        raise ValueError(f"end ({end} s) must not come before start ({start} s).")


def _whole(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def sample_indices(total: int, num_frames: int | None, fps: float | None, native_fps: float | None, max_frames):
    """Indices of the frames to keep among `total` (see `PVCVideoProcessor.sample_frames`)."""
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


def read_video(
    path: str,
    num_frames,
    fps=None,
    max_frames=None,
    start=None,
    end=None,
    transform=None,
    *,
    choose=None,
    with_metadata: bool = False,
):
    """Decode only the sampled frames of a video file, an http(s) URL or a base64 data: URL with PyAV.

    The frames' timestamps and keyframes are read first, without decoding: from the index an MP4/MOV file lists where
    it is regular (see `_listed_index`), else from the packets (as decord does when it opens a file). They give the
    exact frame count, and each sampling rule's instants are mapped to the frame nearest in time. For a
    constant frame rate that is frame index i for instant i / rate, so the picks are the authors'; for a variable frame
    rate the picks are spread evenly in time, not in frame count (a slow-motion or screen-recorded stretch holds many
    more frames per second than the rest). Frames are then decoded in order, seeking only where the next pick's
    keyframe lies past the decoder's position (see `_decode_at`): never more than one linear decode, and no more than
    the groups of pictures that hold the picks, whatever the keyframe spacing.

    An http(s) URL is downloaded once, whole, into a temporary file (deleted when the frames are read), and read from
    there: one transfer of the file, whatever the seeks. `transform`, if given, is applied to each picked frame (an
    upright RGB PIL image) as soon as it is decoded, and its results are returned instead: the processor tiles and
    shrinks frames this way, so full-resolution frames are not kept. A frame picked twice is transformed once.

    `choose(total, rate)`, if given, picks the frames instead of the sampling options: positions among the `total`
    frames (at `rate` frames per second). With `with_metadata=True` the result is `(frames, metadata)`: a dict of
    transformers' `VideoMetadata` fields (`total_num_frames`, `fps`, `duration`, `width` and `height` as shown,
    `frames_indices` of the frames returned, `video_backend`)."""
    av = _av()
    metadata = {"video_backend": "pyav"}

    def show(image):
        metadata.setdefault("width", image.width)
        metadata.setdefault("height", image.height)
        return transform(image) if transform else image

    def pick(total: int, rate: float, by_time=None) -> list[int]:
        """The positions to decode among `total` frames (`by_time()`: the sampling rule's, mapped by time)."""
        if choose is not None:
            positions = [int(position) for position in choose(total, rate)]
            if not positions or min(positions) < 0 or max(positions) >= total:
                raise ValueError(f"The frames chosen for {name} must lie in 0 .. {total - 1}; got {positions}.")
        elif by_time is not None:
            positions = by_time()
        else:
            first, last = frame_window(total, start, end, rate, name)
            positions = [first + index for index in sample_indices(last - first + 1, num_frames, fps, rate, max_frames)]
        duration = total / rate if rate else None
        metadata.update(total_num_frames=total, fps=rate or None, duration=duration, frames_indices=positions)
        return positions

    with _local_source(path) as (source, name):
        try:
            frames = _read(av, source, name, show, pick, num_frames, fps, max_frames, start, end)
        except av.error.FFmpegError as error:
            reason = getattr(error, "strerror", None) or str(error)
            raise ValueError(
                f"Could not read the video {name}: {reason}. The file is damaged or not a video."
            ) from None
    if not frames:
        raise ValueError(f"The video {name} has no decodable frames: it is damaged or cut short.")
    return (frames, metadata) if with_metadata else frames


def _av():
    """PyAV, imported only when a video file is read."""
    try:
        import av
    except ImportError:
        raise ImportError("Reading video files needs PyAV: pip install av") from None
    return av


def _read(av, source, name, show, pick, num_frames, fps, max_frames, start, end) -> list:
    def decode(container, stream, times, keyframes, listed=False):
        by_time = functools.partial(
            _sample_by_time, times, stream.time_base, num_frames, fps, max_frames, start, end, name, _rate(stream)
        )
        span = float((times[-1] - times[0]) * stream.time_base)
        positions = pick(len(times), (len(times) - 1) / span if span else _rate(stream), by_time)
        return _decode_at(container, stream, times, keyframes, positions, _shown(show, stream), name, listed)

    with _opened(av, source, name) as (container, stream):
        try:
            listed = _listed_index(container, stream)
        except av.error.FFmpegError:  # damaged where the index is checked: its packets may still be read
            listed = None
        if listed is not None:
            try:
                return decode(container, stream, *listed, listed=True)
            except _IndexMismatch as mismatch:
                logger.debug("%s: %s; reading its packets instead.", name, mismatch)
    with _opened(av, source, name) as (container, stream):  # afresh: an MP4's listed index may have read and sought
        times, keyframes, count = _index(container, stream)
        if times and len(times) == count:
            return decode(container, stream, times, keyframes)
    # Timestamps missing (a raw elementary stream: .h264, .hevc, which cannot seek either) or repeated (some MPEG-PS
    # muxers): the packets still count the frames. They are taken by position, at the nominal rate, in one pass.
    with _opened(av, source, name) as (container, stream):
        positions = pick(count, _rate(stream))
        return _decode_in_order(_decoded(container, stream), positions, _shown(show, stream))


@contextlib.contextmanager
def _opened(av, source, name):
    """The container at `source` (from its start) and its first video stream; errors name the file where it is not a
    video."""
    if isinstance(source, io.BytesIO):
        source.seek(0)
    with av.open(source) as container:
        form = container.format.name
        if form == "image2" or form.endswith("_pipe"):  # FFmpeg's readers of single pictures
            raise ValueError(
                f"{name} is a picture ({form}), not a video: pass it as an image, or several frame files as a list, "
                "which is one video."
            )
        if not container.streams.video:
            kinds = ", ".join(stream.type for stream in container.streams) or "none"
            raise ValueError(
                f"{name} holds no video stream (container {form}, streams: {kinds}): it is damaged or not a video."
            )
        yield container, container.streams.video[0]


def _rate(stream) -> float:
    return float(stream.average_rate or stream.guessed_rate or 0)


def _shown(show, stream):
    """`show` of a decoded frame turned upright (see `_upright`)."""
    rotate_tag = _rotate_tag(stream)
    return lambda frame: show(_upright(frame, rotate_tag))


@contextlib.contextmanager
def _local_source(path: str):
    """What PyAV opens for `path`, and the name errors give it: a local file as is (checked to exist and to hold
    bytes), a data: URL's bytes in memory, an http(s) URL downloaded once into a temporary file."""
    if path.startswith("data:"):  # data:video/mp4;base64,....
        yield io.BytesIO(_data_url_bytes(path)), path[:40] + "..."
    elif path.startswith(("http://", "https://")):
        with tempfile.TemporaryDirectory(prefix="pvc-video-") as folder:
            yield _download(path, os.path.join(folder, "video")), path
    else:
        if not os.path.exists(path):
            raise ValueError(f"Video file not found: {path}")
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            raise ValueError(f"The video file {path} is empty (0 bytes).")
        yield path, path


def _download(url: str, destination: str, timeout: float = 60.0) -> str:
    """`url` saved whole at `destination`, in one request; failures are errors naming the URL."""
    import shutil
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(destination, "wb") as file:
            shutil.copyfileobj(response, file, length=1 << 20)
    except urllib.error.HTTPError as error:
        raise ValueError(f"Could not fetch the video {url}: HTTP {error.code} {error.reason}.") from None
    except (urllib.error.URLError, OSError) as error:  # no such host, refused, timed out, cut off
        reason = getattr(error, "reason", error)
        raise ValueError(f"Could not fetch the video {url}: {reason}. Is the URL reachable?") from None
    if os.path.getsize(destination) == 0:
        raise ValueError(f"The video {url} is empty (the server sent 0 bytes).")
    return destination


def _data_url_bytes(url: str) -> bytes:
    header, _, payload = url.partition(",")
    if not header.endswith(";base64"):
        raise ValueError(f"Only base64 data URLs are read (data:<type>;base64,...); got {url[:40]}...")
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error as error:
        raise ValueError(f"The data URL's base64 payload cannot be decoded: {error}") from None


def _index(container, stream) -> tuple[list[int], list[int], int]:
    """Every frame's presentation timestamp (in the stream's time base) in display order, the positions (in that list)
    of the keyframes, and the number of frames (packets), read from the packets without decoding. Position 0 counts
    as a keyframe when no packet is marked one."""
    stamps, keys, count = set(), set(), 0
    for packet in container.demux(stream):
        if packet.size and not getattr(packet, "is_discard", False):
            count += 1
            if packet.pts is not None:
                stamps.add(packet.pts)
                if packet.is_keyframe:
                    keys.add(packet.pts)
    times = sorted(stamps)
    keyframes = sorted({bisect.bisect_left(times, stamp) for stamp in keys} | ({0} if times else set()))
    return times, keyframes, count


class _IndexMismatch(Exception):
    """The frames decoded disagree with the container's listed index (see `_listed_index`)."""


def _listed_index(container, stream) -> tuple[list[int], list[int]] | None:
    """Every frame's presentation timestamp and the keyframes' positions, as `_index`, from the index an MP4/MOV file
    lists when it is opened (its sample tables) instead of from its packets: an hour of video lists 100,000 frames,
    which the packet pass reads one by one (0.5 s of Python at 360p, longer than decoding 16 picks).

    The index holds decoding times and keyframe flags, not the presentation times the decoder stamps frames with, so
    it is used only where the two are one grid apart: every frame listed (as many as the stream counts, none
    discarded or empty, the last inside the file), decoding times at one constant step, and the first packets (read up
    to a little past the second keyframe) shown on that grid, shifted by the first frame's delay (B-frames), with each
    keyframe shown before the frames decoded after it (closed groups of pictures). Decoding checks every frame it
    meets: each must be the next time on the grid, and each keyframe sought must be at its listed time
    (`_IndexMismatch`). A file that breaks these (a variable rate, open groups of pictures, a cut tail, a stretch
    shown later than the rest) is read by its packets instead, also after decoding has begun. (A stretch shown off
    the grid whose shift is undone before the last packets goes unseen only where no decoding enters or crosses
    it, and then none of its frames is returned.) None for other containers (MKV, WebM and MPEG-TS list keyframes at most;
    AVI lists empty packets as frames), and under a PyAV older than 17, which does not expose the index."""
    entries = getattr(stream, "index_entries", None)
    if entries is None or "mp4" not in container.format.name.split(","):
        return None
    count = len(entries)
    if count < 2 or count != stream.frames:
        return None
    stamps, keyframes, end = [], [], 0
    for position, entry in enumerate(entries):
        if entry.is_discard or not entry.size:
            return None
        stamps.append(entry.timestamp)
        end = max(end, entry.pos + entry.size)
        if entry.is_keyframe:
            keyframes.append(position)
    step = stamps[1] - stamps[0]
    if step <= 0 or not keyframes or keyframes[0] != 0 or end > container.size > 0:
        return None
    if any(later - earlier != step for earlier, later in itertools.pairwise(stamps)):
        return None
    head = min(keyframes[1] + 16 if len(keyframes) > 1 else 64, 2000)
    first = [packet for packet in itertools.islice(container.demux(stream), head) if packet.size]
    if not first or any(packet.pts is None or packet.dts != stamp for packet, stamp in zip(first, stamps)):
        return None
    delay = first[0].pts - stamps[0]
    on_grid = all((packet.pts - delay - stamps[0]) % step == 0 and packet.pts >= first[0].pts for packet in first)
    keys_shown_first = all(packet.pts == packet.dts + delay for packet in first if packet.is_keyframe)
    if not (on_grid and keys_shown_first and _tail_on_grid(container, stream, stamps, delay)):
        return None
    return [stamps[0] + delay + position * step for position in range(count)], keyframes


def _tail_on_grid(container, stream, stamps: list[int], delay: int, length: int = 64) -> bool:
    """Whether the last `length` packets are the index's last entries and are shown on its grid up to its very end:
    a gap in the shown times anywhere before them (a stretch of the file whose frames are delayed more, as after
    joining two encodes) pushes the last frames past the end of the grid."""
    step, end = stamps[1] - stamps[0], stamps[-1] + delay
    container.seek(stamps[max(0, len(stamps) - length)], stream=stream, backward=True, any_frame=True)
    last = [packet for packet in container.demux(stream) if packet.size]
    offset = len(stamps) - len(last)
    return (
        bool(last)
        and offset >= 0
        and all(packet.dts == stamps[offset + index] for index, packet in enumerate(last))
        and all(packet.pts is not None and (end - packet.pts) % step == 0 for packet in last)
        and max(packet.pts for packet in last) == end
    )


def frame_window(total: int, start, end, rate: float, path) -> tuple[int, int]:
    """First and last frame (inclusive, as `load_video`) of the start/end window at a constant rate."""
    first = 0 if start is None else max(0, round(start * rate))
    last = total - 1 if end is None else min(total - 1, round(end * rate))
    if last < first:
        raise ValueError(f"The window [{start}, {end}] s holds no frame of {path} ({total} frames).")
    return first, last


def _sample_by_time(times, time_base, num_frames, fps, max_frames, start, end, path, nominal=0.0) -> list[int]:
    """Positions (in `times`) of the frames to decode: the sampling rule's instants, each the nearest frame."""
    seconds = [float((stamp - times[0]) * time_base) for stamp in times]

    def nearest(instant: float) -> int:  # ties go to the earlier frame
        after = bisect.bisect_left(seconds, instant)
        if after == len(seconds) or (after > 0 and instant - seconds[after - 1] <= seconds[after] - instant):
            return after - 1
        return after

    # the container's rate where the frames keep it (1/25 s in floats is not exact: 0.3 s * 24.99999 rounds down)
    rate = nominal or ((len(seconds) - 1) / seconds[-1] if seconds[-1] else 0.0)
    if rate and all(abs(second - index / rate) < 0.25 / rate for index, second in enumerate(seconds)):
        # a constant rate: the window is the authors' frames round(start * rate) .. round(end * rate)
        first, last = frame_window(len(times), start, end, rate, path)
    else:
        first = 0 if start is None else nearest(start)
        last = len(times) - 1 if end is None else nearest(end)
    if last < first or (start is not None and start > seconds[-1]):
        raise ValueError(
            f"The window [{start}, {end}] s holds no frame of {path} ({len(times)} frames, shown from 0 to "
            f"{seconds[-1]:.3f} s)."
        )
    # The rules pick among `count` evenly spaced instants from the first to the last frame of the window; at a
    # constant rate these instants are the frames' own.
    count, span = last - first + 1, seconds[last] - seconds[first]
    indices = sample_indices(count, num_frames, fps, (count - 1) / span if span else 1.0, max_frames)
    if len(indices) >= count:
        return [first + index for index in indices]  # every frame once (or evenly repeated), by position
    positions = [nearest(seconds[first] + span * index / (count - 1)) for index in indices]
    # With fps, each frame at most once (a variable rate may put two instants nearest to one frame)
    return list(dict.fromkeys(positions)) if fps is not None else positions


def _decode_at(
    container, stream, times: list[int], keyframes: list[int], positions: list[int], show, name, listed: bool = False
) -> list:
    """`show` of the frames at the given (possibly repeated) positions in `times`, in the order given.

    The picks are visited in order. The decoder goes forward from where it is unless the pick's keyframe (the last
    keyframe at or before it) lies past the decoder's position: then it seeks to that keyframe, skipping frames it
    would otherwise decode for nothing. So each group of pictures that holds a pick is decoded once, up to its last
    pick, and no frame twice. A pick past the last frame that decodes (a cut or damaged tail) is that last frame.
    Where timestamps shift after a seek (see `_Seeker`), the frames are taken in one pass from the start instead.
    With `listed` times (see `_listed_index`), a frame off their grid or an early end is an `_IndexMismatch`."""
    wanted = sorted(set(positions))
    seek = _Seeker(container, stream, times, keyframes)
    try:
        found, decoded = _visit(seek, wanted, show, name, seeking=True, listed=listed)
    except _UnreliableSeek:
        if listed:
            raise _IndexMismatch("a keyframe decodes at a time its index does not list") from None
        logger.debug("%s: timestamps shift after a seek; decoding from the start without seeking.", name)
        found, decoded = _visit(seek, wanted, show, name, seeking=False)
    logger.debug(
        "Decoded %d frames with %d seeks for %d picks among %d frames (%d keyframes).",
        decoded,
        seek.seeks,
        len(wanted),
        len(times),
        len(keyframes),
    )
    return [found[index] for index in positions if index in found]


def _visit(seek, wanted: list[int], show, name, seeking: bool, listed: bool = False) -> tuple[dict, int]:
    """`{position: show(frame)}` for the sorted positions `wanted`, and how many frames were decoded: seeking past
    keyframes (positions from the frames' timestamps), or in one pass from the start (positions by counting).
    `listed`: the times are a container's listed grid: each decoded frame must be the next time on it (after a seek,
    the keyframe sought), else `_IndexMismatch`."""
    times, keyframes = seek.times, seek.keyframes
    found, decoder, position, current, decoded = {}, None, -1, None, 0
    for target in wanted:
        if current is not None and position >= target:  # the decoder skipped past it: the frame at its position
            found[target] = found[position] if position in found else show(current)
            continue
        keyframe = keyframes[bisect.bisect_right(keyframes, target) - 1]
        if decoder is None or (seeking and keyframe > position):
            decoder, landed = seek(target) if seeking else seek.start(check=False)
            if decoder is None:  # nothing decodes from here on
                if listed:
                    raise _IndexMismatch(f"nothing decodes from position {target} of the {len(times)} listed")
                break
            position = landed - 1 if seeking else -1
        for frame in decoder:  # (a decoding error ends it, see `_decoded`)
            decoded += 1
            counted = not seeking or frame.pts is None
            shown = position + 1  # the next frame in display order: a decoder skips none
            position = shown if counted else bisect.bisect_left(times, frame.pts)
            if listed and (counted or position != shown or position == len(times) or times[position] != frame.pts):
                raise _IndexMismatch(f"a frame decodes at time {frame.pts}, not the next time its index lists")
            current = frame
            if position >= target:
                found[target] = show(frame)
                break
        else:  # the stream ends before the target: this and every later pick are its last frame
            if listed:
                raise _IndexMismatch(f"the frames end at position {position} of the {len(times)} listed")
            if current is None:
                break
            later = [index for index in wanted if index >= target]
            logger.warning(
                "%s: frames decode up to position %d of the %d its packets list (a cut or damaged end); the %d "
                "frame(s) picked after that are that last frame.",
                name,
                position,
                len(times),
                len(later),
            )
            found.update(dict.fromkeys(later, show(current)))
            break
    return found, decoded


class _UnreliableSeek(Exception):
    pass


class _Seeker:
    """Decoders that start at a keyframe at or before a target position.

    It asks for the target's keyframe by its timestamp. Some demuxers land later than asked: MPEG-TS lands on the
    keyframe after the one asked for, or yields no frame at all when asked for its last one. A landing past the
    target is retried one keyframe earlier, and the lag learnt is kept for the next seeks (one seek each, not two);
    the very start is the last resort."""

    def __init__(self, container, stream, times: list[int], keyframes: list[int]):
        self.container, self.stream, self.times, self.keyframes = container, stream, times, keyframes
        self.keytimes = {times[position] for position in keyframes}
        self.lag, self.seeks = 0, 0

    def __call__(self, target: int):
        """A decoder whose first frame is at or before position `target`, and that frame's position; `(None, -1)`
        when nothing decodes."""
        index = bisect.bisect_right(self.keyframes, target) - 1
        for lag in range(self.lag, index + 1):
            decoder, position = self._from(self.times[self.keyframes[index - lag]])
            if decoder is not None and position <= target:
                self.lag = lag
                return decoder, position
        return self.start()

    def start(self, check: bool = True):
        """A decoder from the very start (asked for as time 0 or earlier: MPEG-TS lands a keyframe late when asked
        for its first one)."""
        return self._from(min(0, self.times[0]), check)

    def _from(self, stamp: int, check: bool = True):
        self.container.seek(stamp, stream=self.stream, backward=True)
        self.seeks += 1
        decoder = _decoded(self.container, self.stream)
        first = next(decoder, None)
        if first is None:
            return None, -1
        if check and first.key_frame and first.pts is not None and first.pts not in self.keytimes:
            # A keyframe the packets do not list at that time: this demuxer's timestamps shift after a seek (MPEG-PS
            # does, by a frame), so positions read from them would be off.
            raise _UnreliableSeek
        # a frame without a timestamp: taken to be the keyframe asked for
        stamp = stamp if first.pts is None else first.pts
        return itertools.chain([first], decoder), bisect.bisect_left(self.times, stamp)


def _decoded(container, stream):
    """The stream's frames from the container's read position. FFmpeg's decoders skip what they cannot read; an error
    that PyAV raises instead (damaged data) ends the frames here, with a warning, as the end of the file would."""
    try:
        yield from container.decode(stream)
    except _av().error.FFmpegError as error:
        logger.warning("Decoding stopped at damaged data (%s); the frames after it are treated as missing.", error)


def _decode_in_order(decoder, indices: list[int], show) -> list:
    """`show` of the frames at the given (sorted, possibly repeated) indices, counting frames from the start."""
    wanted, found, last, decoded = set(indices), {}, None, 0
    for index, frame in enumerate(decoder):
        last, decoded = frame, decoded + 1
        if index in wanted:
            found[index] = show(frame)
            if len(found) == len(wanted):
                break
    logger.debug("Decoded %d frames with 0 seeks for %d picks, in one pass from the start.", decoded, len(wanted))
    if last is None:
        return []
    missing = [index for index in indices if index not in found]
    if missing:
        found.update(dict.fromkeys(missing, show(last)))
    return [found[index] for index in indices]


def _upright(frame, rotate_tag: float = 0) -> Image.Image:
    """A decoded frame as a viewer shows it: turned and mirrored by its display matrix (a phone held upright
    records its frames sideways and says so there; a front camera may mirror them), as ffmpeg's player does and as
    images are by their EXIF orientation. Without a matrix, turned by the legacy `rotate` tag (clockwise degrees)."""
    image = Image.fromarray(frame.to_ndarray(format="rgb24"))  # as `to_image()`, in half the time
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


__all__ = ["check_sampling", "frame_window", "read_video", "sample_indices"]
