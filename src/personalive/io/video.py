"""Video files, streamed one frame at a time with PyAV (constant memory whatever the length).

`VideoReader` yields uint8 (H, W, 3) RGB frames. `VideoWriter` encodes H.264 (libx264, yuv420p) into an MP4 at an
exact frame rate, carries the audio track of another file over (trimmed to the video), and only puts the file at its
destination when writing succeeded: an interrupted write leaves nothing behind.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from types import TracebackType

import av
import numpy as np

from personalive.errors import VideoReadError, reason

logger = logging.getLogger(__name__)

DEFAULT_FPS = 25.0  # used when a file states no frame rate; also the official offline output rate
_MP4_AUDIO_CODECS = frozenset({"aac", "mp3", "ac3", "eac3", "alac"})  # copied as-is; anything else -> AAC


class VideoReader:
    """Decode the first video stream of a file, one RGB frame at a time.

    Iterate once: `for frame in reader` yields uint8 arrays (H, W, 3). Undecodable packets are skipped (one warning
    per file, frames may be missing); a container that cannot be read further ends the iteration early (a warning).
    Display-rotation metadata is not applied: frames come out as stored.

    Raises:
        VideoReadError: the file is missing, is not a video, has no video stream, or yields no frame at all.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise VideoReadError(f"{self.path} not found")
        if not self.path.is_file():
            raise VideoReadError(f"{self.path} is not a readable video (it is a directory)")
        try:
            self._container = av.open(str(self.path))
        except (av.FFmpegError, UnicodeDecodeError) as e:
            raise VideoReadError(f"{self.path} is not a readable video ({_reason(e)})") from e
        if not self._container.streams.video:
            self._container.close()
            raise VideoReadError(f"{self.path} has no video stream")
        self._stream = self._container.streams.video[0]
        self._stream.thread_type = "AUTO"
        self._started = False

        rate = self._stream.average_rate or self._stream.guessed_rate
        if rate:
            self.rate = Fraction(rate.numerator, rate.denominator)
        else:
            logger.warning("%s states no frame rate; assuming %g fps", self.path, DEFAULT_FPS)
            self.rate = Fraction(DEFAULT_FPS)

    @property
    def stated_frames(self) -> int:
        """Frames the container states without decoding (MP4: its sample table); 0 when it states none."""
        return int(self._stream.frames or 0)

    @property
    def fps(self) -> float:
        """Frames per second (float); `rate` holds the exact fraction, e.g. 30000/1001."""
        return float(self.rate)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the frames, as stated by the stream."""
        return self._stream.codec_context.width, self._stream.codec_context.height

    @property
    def num_frames(self) -> int | None:
        """Frame count from the file header, or None if absent. A hint only: headers can overstate it."""
        return self._stream.frames or None

    @property
    def has_audio(self) -> bool:
        return bool(self._container.streams.audio)

    def __iter__(self) -> Iterator[np.ndarray]:
        if self._started:
            raise RuntimeError(f"{self.path}: a VideoReader can be iterated only once; open a new one")
        self._started = True
        return self._frames()

    def _frames(self) -> Iterator[np.ndarray]:
        produced = skipped = 0
        packets = self._container.demux(self._stream)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                break
            except av.FFmpegError as e:
                logger.warning("%s: cannot read past frame %d (%s); stopping there", self.path, produced, _reason(e))
                break
            try:
                frames = packet.decode()  # the empty packet at the end flushes the decoder
            except av.FFmpegError as e:
                if not skipped:
                    logger.warning(
                        "%s: skipping undecodable data after frame %d (%s); frames may be missing",
                        self.path,
                        produced,
                        _reason(e),
                    )
                skipped += 1
                continue
            for frame in frames:
                produced += 1
                yield frame.to_ndarray(format="rgb24")
        if skipped:
            logger.debug("%s: %d undecodable packet(s) skipped", self.path, skipped)
        if not produced:
            raise VideoReadError(f"{self.path} has no decodable video frames")

    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class VideoWriter:
    """Encode uint8 RGB frames to an H.264 MP4 (libx264, yuv420p), optionally with the audio of another file.

    Frames go to a hidden `.<stem>.partial.mp4` beside `path`, which is renamed to `path` when the `with` block
    ends normally; if it ends with an exception (KeyboardInterrupt included) the partial file is deleted and `path`
    is left untouched. The container is MP4 whatever the suffix of `path`.

    yuv420p needs even sizes: a frame with an odd width or height is padded by repeating its last column/row, so
    the file is at most one pixel wider/taller than the frames. The frame rate is kept exactly (29.97 -> 2997/100,
    30000/1001 as a Fraction stays 30000/1001). The audio of `audio_from` (if it has any) is copied when its codec
    fits MP4 (AAC, MP3, AC-3, E-AC-3, ALAC), else transcoded to AAC, and trimmed to the video's duration (to the
    packet when copied, to the sample when transcoded); it is interleaved as frames are written, so memory stays
    constant. A file with late-starting clocks (MPEG-TS) has its audio shifted so it starts with the first frame.

    Example:
        with VideoReader(src) as reader, VideoWriter(dst, reader.rate, audio_from=src) as writer:
            for frame in reader:
                writer.write(frame)
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fps: float | Fraction,
        audio_from: str | os.PathLike | None = None,
        crf: int = 18,
    ):
        if not fps or fps <= 0:
            raise ValueError(f"fps must be positive, got {fps!r}")
        self.path = Path(path)
        self.rate = _as_fraction(fps)
        self.audio_from = Path(audio_from) if audio_from is not None else None
        self.crf = crf
        self.num_frames = 0
        self._tmp = self.path.with_name(f".{self.path.stem}.partial.mp4")
        self._container: av.container.OutputContainer | None = None
        self._video: av.video.stream.VideoStream | None = None
        self._audio: _AudioCarrier | None = None
        self._frame_size: tuple[int, int] | None = None

    def __enter__(self) -> VideoWriter:
        if self.audio_from is not None:  # a bad audio source fails here, before any frame is made
            self._audio = _AudioCarrier.open(self.audio_from)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._container = av.open(str(self._tmp), "w", format="mp4", options={"movflags": "faststart"})
        except BaseException:
            if self._audio is not None:
                self._audio.close()
            raise
        return self

    def write(self, frame: np.ndarray) -> None:
        """Encode one frame: uint8 (H, W, 3) RGB; every frame must have the size of the first."""
        if self._container is None:
            raise RuntimeError("VideoWriter.write() called outside its `with` block")
        if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            shape = getattr(frame, "shape", None)
            raise ValueError(
                f"expected a uint8 array (H, W, 3), got {type(frame).__name__} {shape} {getattr(frame, 'dtype', '')}"
            )
        if self._video is None:
            self._open_streams(frame.shape[0], frame.shape[1])
        elif frame.shape[:2] != self._frame_size:
            raise ValueError(
                f"frame {self.num_frames} is {frame.shape[1]}x{frame.shape[0]}, but the video is "
                f"{self._frame_size[1]}x{self._frame_size[0]}"
            )
        h, w = frame.shape[:2]
        if h % 2 or w % 2:
            frame = np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        video_frame.pts = self.num_frames
        video_frame.time_base = 1 / self.rate
        self._container.mux(self._video.encode(video_frame))
        self.num_frames += 1
        if self._audio is not None:
            self._audio.mux_until(self.num_frames / self.rate)

    def _open_streams(self, height: int, width: int) -> None:
        self._frame_size = (height, width)
        self._video = self._container.add_stream("libx264", rate=self.rate)
        self._video.width, self._video.height = width + width % 2, height + height % 2
        self._video.pix_fmt = "yuv420p"
        self._video.codec_context.time_base = 1 / self.rate
        self._video.options = {"crf": str(self.crf)}
        if self._audio is not None:  # every stream must exist before the first packet is written
            self._audio.add_to(self._container)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self._discard()
            return
        try:
            if not self.num_frames:
                raise ValueError(f"no frames were written to {self.path}")
            self._container.mux(self._video.encode())  # flush the encoder
            if self._audio is not None:
                self._audio.finish(self.num_frames / self.rate)
            self._container.close()
            os.replace(self._tmp, self.path)
        except BaseException:
            self._discard()
            raise
        logger.info(
            "wrote %s: %d frames at %s fps%s",
            self.path,
            self.num_frames,
            self.rate,
            " with audio" if self._audio is not None else "",
        )

    def _discard(self) -> None:
        """Close everything and delete the partial file; called while another exception propagates."""
        if self._audio is not None:
            self._audio.close()
        try:
            self._container.close()
        except av.FFmpegError as e:  # the file is being thrown away; the original exception matters
            logger.debug("closing partial %s: %s", self._tmp, e)
        self._tmp.unlink(missing_ok=True)


class _AudioCarrier:
    """Moves the first audio track of a file into an output container: packets copied, or transcoded to AAC.

    While frames are being written, a packet is written once the video has passed its end; `finish` then writes
    whatever starts before the end of the video: whole packets when copying, exact samples when transcoding.
    """

    def __init__(self, path: Path, source: av.container.InputContainer):
        self.path = path
        self._source = source
        self._in = source.streams.audio[0]
        self._copy = self._in.codec_context.codec.canonical_name in _MP4_AUDIO_CODECS  # "mp3", not "mp3float"
        # MPEG-TS and the like start their clocks late: shift so that the audio starts with the first video frame
        start = source.start_time / av.time_base if source.start_time is not None else 0.0
        self._offset = max(0.0, start)
        self._packets = source.demux(self._in)
        self._ahead: av.Packet | None = None  # one packet read but not yet written
        self._skipped = 0

    @classmethod
    def open(cls, path: Path) -> _AudioCarrier | None:
        """The audio track of `path`, or None (logged) if it has none."""
        if not path.is_file():
            raise VideoReadError(f"{path} not found (the audio source)")
        try:
            source = av.open(str(path))
        except (av.FFmpegError, UnicodeDecodeError) as e:
            raise VideoReadError(f"{path} is not a readable media file ({_reason(e)}); cannot take its audio") from e
        if not source.streams.audio:
            logger.info("%s has no audio track; writing video only", path)
            source.close()
            return None
        return cls(path, source)

    def add_to(self, output: av.container.OutputContainer) -> None:
        """Create the output audio stream; must happen before the first packet is written."""
        self._output = output
        if self._copy:
            self._out = output.add_stream_from_template(self._in)
        else:
            self._out = output.add_stream("aac", rate=self._in.codec_context.sample_rate)
            # a native layout the AAC encoder accepts; more than two channels are downmixed to stereo
            self._out.layout = "mono" if self._in.codec_context.channels == 1 else "stereo"
            logger.info("%s: transcoding %s audio to AAC", self.path, self._in.codec_context.codec.canonical_name)

    def _peek(self) -> av.Packet | None:
        """The next packet with data, shifted to the output timeline, or None at the end of the track."""
        while self._ahead is None:
            try:
                packet = next(self._packets)
            except StopIteration:
                return None
            except av.FFmpegError as e:
                logger.warning("%s: cannot read audio further (%s); the rest is silent", self.path, _reason(e))
                self._packets = iter(())
                return None
            if not packet.size or packet.pts is None:
                continue
            if self._offset:
                shift = round(self._offset / packet.time_base)
                packet.pts -= shift
                if packet.dts is not None:
                    packet.dts -= shift
            self._ahead = packet
        return self._ahead

    def mux_until(self, seconds: float) -> None:
        """Write every packet that ends by `seconds` of the output timeline."""
        while (packet := self._peek()) is not None and (
            packet.pts + (packet.duration or 0)
        ) * packet.time_base <= seconds:
            self._write(packet, end=None)

    def finish(self, seconds: float) -> None:
        """Write the audio that starts before `seconds` (the end of the video), flush and close the source."""
        while (packet := self._peek()) is not None and packet.pts * packet.time_base < seconds:
            self._write(packet, end=seconds)
        if not self._copy:
            try:
                frames = self._in.codec_context.decode(None)  # frames still inside the decoder
            except av.FFmpegError:
                frames = []
            for frame in frames:
                self._encode(frame, end=seconds)
            self._output.mux(self._out.encode(None))
        self.close()

    def _write(self, packet: av.Packet, end: float | None) -> None:
        self._ahead = None
        if self._copy:
            packet.stream = self._out
            self._output.mux(packet)
            return
        try:
            frames = packet.decode()
        except av.FFmpegError as e:
            if not self._skipped:
                logger.warning("%s: skipping undecodable audio (%s)", self.path, _reason(e))
            self._skipped += 1
            return
        for frame in frames:
            self._encode(frame, end)

    def _encode(self, frame: av.AudioFrame, end: float | None) -> None:
        """Encode a decoded frame, cut at `end` seconds when given."""
        if end is not None and frame.pts is not None:
            start = float(frame.pts * frame.time_base)
            keep = round((end - start) * frame.sample_rate)
            if keep <= 0:
                return
            if keep < frame.samples:
                samples = frame.to_ndarray()  # planar: (channels, n); packed: (1, n * channels)
                width = keep if frame.format.is_planar else keep * len(frame.layout.channels)
                cut = av.AudioFrame.from_ndarray(
                    np.ascontiguousarray(samples[:, :width]), format=frame.format.name, layout=frame.layout
                )
                cut.sample_rate, cut.pts, cut.time_base = frame.sample_rate, frame.pts, frame.time_base
                frame = cut
        self._output.mux(self._out.encode(frame))

    def close(self) -> None:
        self._source.close()


def _as_fraction(fps: float | Fraction) -> Fraction:
    """A frame rate as an exact fraction: 30000/1001 given as a float comes back as 30000/1001, 25.0 as 25."""
    return Fraction(fps).limit_denominator(100_000)


def _reason(e: BaseException) -> str:
    """A one-line cause from a PyAV error (its strerror, without the file name PyAV appends)."""
    return getattr(e, "strerror", None) or reason(e)
