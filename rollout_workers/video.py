"""Clips of evaluation episodes: what the car did, and what the policy saw.

Each frame of a clip is ``uint8[FRAME_HEIGHT, FRAME_WIDTH, 3]`` RGB
(384 × 672 px), laid out as::

    +------------------------+------------------------+
    | the env's render()     | the policy's input:    |
    | (highway-env's top-    | the newest of its 4    |
    | down view), fitted     | stacked 84×84 frames,  |
    | into 336 × 336         | 4× nearest-neighbour   |
    +------------------------+------------------------+
    | episode, step, speed km/h, steer, throttle/brake, return, end reason |
    +------------------------------------------------------------------+

with bars for steer and throttle/brake in the text strip. One frame per env
step (after ``reset`` and after each ``step``: the action shown is the one
that led to the frame), at the env's ``metadata["render_fps"]`` (5 for the
racetrack: real time) unless told otherwise.

Encoding is imageio's (Klein et al., https://imageio.readthedocs.io):

* ``.mp4``: H.264, ``yuv420p`` (plays in every browser) through imageio's
  ffmpeg plugin and the static ffmpeg binary of the ``imageio-ffmpeg`` wheel.
  Frames are streamed to ffmpeg as they come: memory stays flat however long
  the clip.
* ``.gif``: Pillow through imageio, looping. Pillow holds every frame
  (~0.8 MB each) until the file is written: GIFs are for short clips.

A clip is encoded into a private temp directory and returned as ``bytes``
(:meth:`EvaluationVideo.finish`), so a caller on any node can store it
wherever its run lives; :func:`write_video` writes it to a local path
atomically.

Blank frames: highway-env draws nothing when ``SDL_VIDEODRIVER=dummy`` (its
viewer disables itself); the env must render off-screen
(``offscreen_rendering``) with that variable unset. A clip whose env frames are
all blank is still written, with a warning naming the cause.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from td3drive.contracts import spec
from td3drive.contracts.atomic_file import atomic_write

log = logging.getLogger(__name__)

VIDEO_FORMATS = ("mp4", "gif")
"""The clip formats, named by the path's suffix."""
PANEL_PX = 336
"""Side of each square panel, px: 4 × the policy's 84 px frames (and a
multiple of 16, H.264's macro block)."""
STRIP_PX = 48
"""Height of the text strip under the panels, px."""
FRAME_WIDTH = 2 * PANEL_PX
FRAME_HEIGHT = PANEL_PX + STRIP_PX
DEFAULT_FPS = 5.0
"""Frames per second when neither the caller nor the env's ``render_fps`` says."""

_BACKGROUND = (24, 24, 24)
_TEXT = (235, 235, 235)
_LABEL_BOX = (0, 0, 0)
_STEER_COLOR = (80, 160, 255)
_THROTTLE_COLOR = (60, 200, 90)
_BRAKE_COLOR = (230, 70, 60)


class VideoError(ValueError):
    """A clip that cannot be made: an unknown suffix, no ffmpeg for MP4, no
    frames recorded, or an encoder failure (one-line message)."""


def video_format(path: str | Path) -> str:
    """The clip format of ``path``, from its suffix (case-insensitive).

    Returns:
        ``"mp4"`` or ``"gif"``.

    Raises:
        VideoError: any other suffix.
    """
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in VIDEO_FORMATS:
        raise VideoError(
            f"video path must end in .mp4 or .gif, got {os.fspath(path)!r}"
            + (f" (.{suffix})" if suffix else " (no suffix)")
        )
    return suffix


def write_video(path: str | Path, data: bytes) -> Path:
    """Write an encoded clip to ``path`` atomically (parents created).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        OSError: it cannot be written (nothing is left half-written).
    """
    return atomic_write(path, lambda handle: handle.write(data))


def _font(size: int) -> Any:
    """Pillow's bundled scalable font (Pillow >= 10.1 with FreeType), else its bitmap one."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # older Pillow or no FreeType
        return ImageFont.load_default()


_FONT = _font(14)
_SMALL_FONT = _font(12)


def _fit(image: np.ndarray, side: int) -> Image.Image:
    """``image`` (``uint8[H, W]`` or ``uint8[H, W, 3|4]``) scaled to fit a
    ``side × side`` square, aspect kept: nearest-neighbour when enlarging (the
    pixels stay visible), Lanczos when shrinking."""
    array = np.ascontiguousarray(image)
    if array.dtype != np.uint8:
        raise VideoError(f"frames must be uint8, got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise VideoError(f"a frame must be uint8[H, W] or uint8[H, W, 3|4], got {array.shape}")
    picture = Image.fromarray(array).convert("RGB")
    scale = min(side / picture.width, side / picture.height)
    size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS
    return picture.resize(size, resample)


def _label(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str) -> None:
    """``text`` on a dark box at ``xy`` (readable over any panel)."""
    left, top, right, bottom = draw.textbbox(xy, text, font=_SMALL_FONT)
    draw.rectangle((left - 3, top - 2, right + 3, bottom + 2), fill=_LABEL_BOX)
    draw.text(xy, text, fill=_TEXT, font=_SMALL_FONT)


def _bar(
    draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], value: float, color: Any
) -> None:
    """A centred bar for ``value`` in ``[-1, 1]`` inside ``box`` (outline drawn);
    ``color`` is one color or ``(positive, negative)``."""
    left, top, right, bottom = box
    draw.rectangle(box, outline=(120, 120, 120))
    middle = (left + right) // 2
    draw.line((middle, top, middle, bottom), fill=(120, 120, 120))
    value = float(np.clip(value, -1.0, 1.0))
    end = middle + round(value * (right - left - 2) / 2)
    fill = color if not isinstance(color[0], tuple) else color[0 if value >= 0 else 1]
    if end != middle:
        draw.rectangle((min(middle, end), top + 2, max(middle, end), bottom - 2), fill=fill)


def compose_frame(
    view: np.ndarray | None,
    observed: np.ndarray,
    *,
    action: Sequence[float] | np.ndarray | None = None,
    speed_mps: float | None = None,
    text: str = "",
    caption: str = "",
) -> np.ndarray:
    """One clip frame: the env's view beside the policy's input, figures below.

    Args:
        view: the env's ``render()``, ``uint8[H, W, 3]`` (or ``[H, W]`` gray,
            or RGBA), any size, fitted into the left panel; ``None``: the
            panel says the env renders nothing.
        observed: the policy's newest frame, ``uint8[84, 84]`` (the last of
            the ``image`` stack), shown 4× enlarged.
        action: ``[steer, throttle_brake]`` in ``[-1, 1]`` that led to this
            frame (:mod:`td3drive.contracts.spec`), or ``None`` (the first frame).
        speed_mps: the car's speed, m/s (shown in km/h), or ``None`` (unknown).
        text: the strip's second line (episode, step, return, end reason).
        caption: added to the left panel's label (e.g. the policy version).

    Returns:
        ``uint8[FRAME_HEIGHT, FRAME_WIDTH, 3]`` RGB.

    Raises:
        VideoError: a frame that is not ``uint8`` of a supported shape.
    """
    canvas = Image.new("RGB", (FRAME_WIDTH, FRAME_HEIGHT), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if view is not None:
        fitted = _fit(view, PANEL_PX)
        canvas.paste(fitted, ((PANEL_PX - fitted.width) // 2, (PANEL_PX - fitted.height) // 2))
    else:
        middle = (PANEL_PX // 2, PANEL_PX // 2)
        draw.text(middle, "the env renders nothing", fill=_TEXT, font=_FONT, anchor="mm")
    observed = np.asarray(observed)
    if observed.shape != (spec.FRAME_SIZE, spec.FRAME_SIZE):
        raise VideoError(
            f"the policy's frame must be uint8[{spec.FRAME_SIZE}, {spec.FRAME_SIZE}], "
            f"got {observed.shape}"
        )
    canvas.paste(_fit(observed, PANEL_PX), (PANEL_PX, 0))
    _label(draw, (6, 5), "simulator view" + (f" - {caption}" if caption else ""))
    _label(draw, (PANEL_PX + 6, 5), "policy input: newest of 4 frames, 84x84")

    speed = "speed   –   " if speed_mps is None else f"speed {float(speed_mps) * 3.6:5.1f} km/h"
    if action is None:
        steer = throttle = None
        figures = f"{speed}   steer   –     throttle   –"
    else:
        steer = float(action[spec.STEER])
        throttle = float(action[spec.THROTTLE_BRAKE])
        pedal = f"throttle {throttle:4.2f}" if throttle >= 0 else f"brake    {-throttle:4.2f}"
        figures = f"{speed}   steer {steer:+5.2f}   {pedal}"
    top = PANEL_PX + 6
    draw.text((8, top), figures, fill=_TEXT, font=_FONT)
    draw.text((8, top + 20), text, fill=_TEXT, font=_SMALL_FONT)
    # Bars: steer (+ right) and throttle (+) / brake (−), centred at zero.
    bar_left = FRAME_WIDTH - 170
    draw.text((bar_left - 44, top), "steer", fill=_TEXT, font=_SMALL_FONT)
    draw.text((bar_left - 44, top + 20), "pedal", fill=_TEXT, font=_SMALL_FONT)
    _bar(draw, (bar_left, top + 1, FRAME_WIDTH - 10, top + 15), steer or 0.0, _STEER_COLOR)
    _bar(
        draw,
        (bar_left, top + 21, FRAME_WIDTH - 10, top + 35),
        throttle or 0.0,
        (_THROTTLE_COLOR, _BRAKE_COLOR),
    )
    return np.asarray(canvas)


class EvaluationVideo:
    """A clip of the first ``episodes`` evaluation episodes, encoded as it is recorded.

    :func:`rollout_workers.evaluation.evaluate_policy` feeds it (``video=``):
    it asks :meth:`wants` per episode and calls :meth:`add` per step; then
    :meth:`finish` returns the encoded clip. Use as a context manager (or
    call :meth:`close`) so an abandoned clip leaves no temp files or ffmpeg
    process behind.

    Args:
        fmt: ``"mp4"`` or ``"gif"`` (:func:`video_format` of a path).
        fps: frames per second; ``None``: the env's ``render_fps``
            (``evaluate_policy`` sets :attr:`fps` from it), else :data:`DEFAULT_FPS`.
        episodes: how many of the first episodes to record (>= 1).
        caption: drawn on the simulator panel of every frame (e.g. the policy version).

    Raises:
        VideoError: an unknown format, ``episodes < 1``, a non-positive
            ``fps``, or MP4 without the ffmpeg binary (``pip install imageio[ffmpeg]``).
    """

    def __init__(
        self, fmt: str, *, fps: float | None = None, episodes: int = 1, caption: str = ""
    ) -> None:
        if fmt not in VIDEO_FORMATS:
            raise VideoError(f"video format must be one of {VIDEO_FORMATS}, got {fmt!r}")
        if episodes < 1:
            raise VideoError(f"video episodes must be >= 1, got {episodes}")
        if fps is not None and not fps > 0:
            raise VideoError(f"video fps must be > 0, got {fps}")
        if fmt == "mp4":
            try:
                import imageio_ffmpeg

                imageio_ffmpeg.get_ffmpeg_exe()
            except (ImportError, RuntimeError) as exc:
                raise VideoError(
                    f"MP4 needs ffmpeg: pip install 'imageio[ffmpeg]' ({exc})"
                ) from exc
        self.format = fmt
        self.fps = fps
        self.episodes = episodes
        self.caption = caption
        self.frames = 0
        """Frames recorded so far."""
        self.recorded_episodes: set[int] = set()
        """Indices of the episodes with at least one frame."""
        self.blank_views = 0
        """Frames whose env view was uniform (a blank render) or absent."""
        self._dir: str | None = None
        self._writer: Any = None

    # ------------------------------------------------------------ recording
    def wants(self, episode: int) -> bool:
        """Whether episode ``episode`` (0-based) is recorded."""
        return 0 <= episode < self.episodes

    def add(
        self,
        view: np.ndarray | None,
        observed: np.ndarray,
        *,
        episode: int,
        step: int,
        action: Sequence[float] | np.ndarray | None = None,
        speed_mps: float | None = None,
        episode_return: float = 0.0,
        end_reason: str | None = None,
    ) -> None:
        """Record one frame (:func:`compose_frame`).

        Args:
            view: the env's ``render()`` output, or ``None``.
            observed: the policy's newest frame, ``uint8[84, 84]``.
            episode: 0-based episode index; step: env steps taken in it.
            action: the action that led to this frame (``None`` after reset).
            speed_mps: m/s, or ``None``.
            episode_return: the return so far.
            end_reason: why the episode ended, on its last frame.

        Raises:
            VideoError: a malformed frame, or the encoder failed.
        """
        line = f"episode {episode + 1}   step {step:4d}   return {episode_return:+8.2f}"
        if end_reason:
            line += f"   ended: {end_reason}"
        frame = compose_frame(
            view, observed, action=action, speed_mps=speed_mps, text=line, caption=self.caption
        )
        if view is None or int(np.ptp(np.asarray(view))) == 0:
            self.blank_views += 1
        self._append(frame)
        self.frames += 1
        self.recorded_episodes.add(episode)

    def _append(self, frame: np.ndarray) -> None:
        if self._writer is None:
            self._open()
        try:
            self._writer.append_data(frame)
        except (OSError, RuntimeError, ValueError) as exc:
            self.close()
            raise VideoError(f"encoding the {self.format} clip failed: {exc}") from exc

    def _open(self) -> None:
        import imageio.v2 as imageio

        fps = float(self.fps or DEFAULT_FPS)
        self._dir = tempfile.mkdtemp(prefix="td3drive-video-")
        path = os.path.join(self._dir, f"clip.{self.format}")
        if self.format == "mp4":
            # yuv420p: what browsers play; frame sides are multiples of 16
            # (H.264's macro block), so ffmpeg resizes nothing.
            self._writer = imageio.get_writer(
                path,
                format="FFMPEG",
                mode="I",
                fps=fps,
                codec="libx264",
                pixelformat="yuv420p",
                macro_block_size=16,
                ffmpeg_log_level="error",
                # The index first: a browser plays the clip before it has all of it.
                output_params=["-movflags", "+faststart"],
            )
        else:
            # GIF stores frame durations in 10 ms units; loop=0: forever.
            self._writer = imageio.get_writer(path, mode="I", duration=round(1000.0 / fps), loop=0)

    # ------------------------------------------------------------ the end
    def finish(self) -> bytes:
        """Close the encoder and return the clip's bytes (temp files removed).

        Raises:
            VideoError: no frame was recorded, or the encoder failed.
        """
        if self._writer is None or self._dir is None:
            self.close()
            raise VideoError("no frames were recorded: nothing to encode")
        path = os.path.join(self._dir, f"clip.{self.format}")
        try:
            self._writer.close()
            self._writer = None
            data = Path(path).read_bytes()
        except (OSError, RuntimeError, ValueError) as exc:
            raise VideoError(f"encoding the {self.format} clip failed: {exc}") from exc
        finally:
            self.close()
        if self.blank_views == self.frames:
            log.warning(
                "every simulator frame of the %s clip is blank or missing: highway-env draws "
                "nothing under SDL_VIDEODRIVER=dummy (unset it; the env renders off-screen)",
                self.format,
            )
        return data

    def close(self) -> None:
        """Drop the encoder and the temp files (idempotent; the clip is lost
        unless :meth:`finish` returned it)."""
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception as exc:  # closing a broken encoder: nothing more to save
                log.debug("closing the %s encoder: %r", self.format, exc)
        directory, self._dir = self._dir, None
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)

    def __enter__(self) -> EvaluationVideo:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def describe(self, path: str | None, data: bytes) -> dict[str, Any]:
        """``{"path", "format", "fps", "episodes", "frames", "size_bytes"}`` of a
        finished clip (for results and logs; ``path`` may be ``None``)."""
        return {
            "path": path,
            "format": self.format,
            "fps": float(self.fps or DEFAULT_FPS),
            "episodes": len(self.recorded_episodes),
            "frames": self.frames,
            "size_bytes": len(data),
        }


def key_frames(path: str | Path, count: int = 4) -> list[tuple[int, np.ndarray]]:
    """Up to ``count`` frames of a clip, evenly spaced from the first to the
    last (two passes over the file: the first counts, since MP4 headers do
    not reliably give a frame count).

    Returns:
        ``[(frame index, uint8[H, W, 3]), ...]`` in order.

    Raises:
        VideoError: the file cannot be decoded (or ``count < 1``).
    """
    import imageio.v3 as iio

    if count < 1:
        raise VideoError(f"count must be >= 1, got {count}")
    source = Path(path)
    # MP4 through the ffmpeg plugin explicitly (imageio would try PyAV first).
    options: dict[str, Any] = {"plugin": "FFMPEG"} if source.suffix.lower() == ".mp4" else {}
    try:
        total = sum(1 for _ in iio.imiter(source, **options))
        if total == 0:
            return []
        wanted = sorted({round(i * (total - 1) / max(count - 1, 1)) for i in range(count)})
        picked = []
        for index, frame in enumerate(iio.imiter(source, **options)):
            if index in wanted:
                picked.append((index, np.asarray(frame)[..., :3]))
    except (OSError, RuntimeError, ValueError) as exc:
        raise VideoError(f"{source}: cannot decode: {exc}") from exc
    return picked
