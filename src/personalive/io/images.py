"""Still images: reading a reference portrait, fitting frames to a size, and converting frames between uint8 arrays
and model tensors.

Every image leaves `load_image` as an 8-bit RGB `PIL.Image`, whatever the file held: EXIF orientation is applied,
transparency is composited on white, grey/palette/CMYK become RGB, and 16-bit samples are scaled (not clipped) to
8 bits. Frames travel as uint8 `(n, H, W, 3)` arrays; models take float32 `(n, 3, H, W)` tensors in [-1, 1].
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image, ImageOps, UnidentifiedImageError

from personalive.errors import ImageReadError

logger = logging.getLogger(__name__)

MAX_SIDE = 4096  # larger images are downscaled on load; the models work at 512 px
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_16BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# the official pipelines' input preparation; vae_scale_factor=1 keeps any size (the default rounds down to 8s)
_processor = VaeImageProcessor(vae_scale_factor=1, do_resize=True, do_normalize=True, do_convert_rgb=True)


def load_image(path: str | os.PathLike, max_side: int = MAX_SIDE) -> Image.Image:
    """Read an image file as 8-bit RGB, upright (EXIF orientation applied), at most `max_side` px on its long side.

    Raises:
        ImageReadError: the file is missing or is not an image Pillow can decode.
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"{path} not found")
    if not path.is_file():
        raise ImageReadError(f"{path} is not a readable image (it is a directory)")
    try:
        with Image.open(path) as image:
            image.load()  # decode now, so a truncated file fails here rather than later
            image = ImageOps.exif_transpose(image)
            image = _to_rgb8(image)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as e:
        raise ImageReadError(f"{path} is not a readable image ({e})") from e

    if max(image.size) > max_side:
        w, h = image.size
        scale = max_side / max(w, h)
        new_size = (max(1, round(w * scale)), max(1, round(h * scale)))
        logger.warning("%s is %dx%d; downscaled to %dx%d (max side %d px)", path, w, h, *new_size, max_side)
        image = image.resize(new_size, Image.Resampling.LANCZOS)
    return image


def _to_rgb8(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit "RGB"."""
    mode = image.mode
    if mode == "RGB":
        return image.copy()
    if mode in _16BIT_MODES or mode in ("I", "F"):
        return Image.fromarray(_scale_to_uint8(np.asarray(image), mode), mode="L").convert("RGB")
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # "1", "L", "P", "CMYK", "YCbCr", "LAB", "HSV"


def _scale_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Single-channel samples of more than 8 bits -> uint8 by scaling their range onto [0, 255]."""
    values = values.astype(np.float64)
    if mode in _16BIT_MODES or (mode == "I" and values.min() >= 0 and values.max() <= 65535):
        low, high = 0.0, 65535.0  # 16-bit samples (Pillow opens some 16-bit files as "I")
    elif mode == "F" and values.min() >= 0 and values.max() <= 1:
        low, high = 0.0, 1.0  # float images in [0, 1]
    else:
        low, high = float(values.min()), float(values.max())  # anything else: stretch its own range
    scaled = (values - low) / max(high - low, 1e-12) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 frames (n, H, W, 3) in [0, 255] -> float32 tensor (n, 3, H, W) in [-1, 1] (official: x / 255 * 2 - 1)."""
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected a uint8 array (n, H, W, 3), got {_describe(frames)}")
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # (n, 3, H, W)
    return x / 255.0 * 2.0 - 1.0


def to_uint8(frames: np.ndarray | torch.Tensor) -> np.ndarray:
    """float frames (n, H, W, 3) in [0, 1] -> uint8 array, truncating like the official `(x * 255).astype(uint8)`.

    Values outside [0, 1] are clipped first (the official pipeline clamps its output before this step).
    """
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().to("cpu", torch.float32).numpy()
    if not isinstance(frames, np.ndarray) or not np.issubdtype(frames.dtype, np.floating):
        raise ValueError(f"expected a float array (n, H, W, 3) in [0, 1], got {_describe(frames)}")
    return (np.clip(frames, 0.0, 1.0) * 255).astype(np.uint8)


def resize_to_tensor(frame: np.ndarray, height: int, width: int) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, height, width) in [-1, 1], resized without keeping the aspect ratio.

    PIL Lanczos, then x / 255 * 2 - 1: diffusers' `VaeImageProcessor`, as the official pipelines prepare their
    motion-extractor inputs and face crops, so the numbers match theirs exactly.
    """
    check_frame(frame)
    return _processor.preprocess(Image.fromarray(np.ascontiguousarray(frame)), height=height, width=width)[0]


def as_rgb_frame(frame: Any) -> np.ndarray:
    """A webcam or video frame -> uint8 (H, W, 3); grey and RGBA frames are converted.

    Raises:
        ValueError: not an image array (the message says what it is).
    """
    if not isinstance(frame, np.ndarray):
        raise ValueError(f"expected an image array, got {type(frame).__name__}")
    if frame.ndim == 2:
        frame = frame[:, :, None].repeat(3, axis=2)
    if frame.ndim != 3 or frame.shape[2] not in (1, 3, 4) or min(frame.shape[:2]) < 1:
        raise ValueError(f"expected an (H, W, 3) image, got shape {frame.shape}")
    if frame.dtype != np.uint8:
        if not np.issubdtype(frame.dtype, np.number):
            raise ValueError(f"expected a numeric image, got dtype {frame.dtype}")
        scale = 255.0 if np.issubdtype(frame.dtype, np.floating) and frame.max(initial=0) <= 1.0 else 1.0
        frame = np.clip(frame * scale, 0, 255).astype(np.uint8)
    if frame.shape[2] == 1:
        frame = frame.repeat(3, axis=2)
    return np.ascontiguousarray(frame[:, :, :3])


def fit_frame(frame: np.ndarray, height: int, width: int, crop: bool = True) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (height, width, 3): centre-crop to the target aspect ratio (unless `crop` is False:
    then the frame is squashed, as the official offline script does), then Lanczos resize.

    Returns `frame` itself when it already has the target size.
    """
    check_frame(frame)
    if frame.shape[:2] == (height, width):
        return frame
    if not crop:
        return np.array(Image.fromarray(np.ascontiguousarray(frame)).resize((width, height), Image.Resampling.LANCZOS))
    h, w = frame.shape[:2]
    if w * height > h * width:  # too wide: keep the middle columns
        keep = max(1, round(h * width / height))
        frame = frame[:, (w - keep) // 2 : (w - keep) // 2 + keep]
    else:  # too tall (or same aspect): keep the middle rows
        keep = max(1, round(w * height / width))
        frame = frame[(h - keep) // 2 : (h - keep) // 2 + keep]
    resized = Image.fromarray(np.ascontiguousarray(frame)).resize((width, height), Image.Resampling.LANCZOS)
    return np.array(resized)


def crop_around(frame: np.ndarray, height: int, width: int, center: tuple[float, float] | None = None) -> np.ndarray:
    """uint8 (H, W, 3) -> (height, width, 3): the largest window of the target aspect ratio, as centred on `center`
    (x, y in pixels; default: the middle) as the frame allows, resized with `fit_frame`."""
    h, w = frame.shape[:2]
    if center is None:
        return fit_frame(frame, height, width)
    crop_w, crop_h = (w, max(1, round(w * height / width))) if w * height <= h * width else (
        max(1, round(h * width / height)), h)
    left = int(min(max(center[0] - crop_w / 2, 0), w - crop_w))
    top = int(min(max(center[1] - crop_h / 2, 0), h - crop_h))
    return fit_frame(np.ascontiguousarray(frame[top : top + crop_h, left : left + crop_w]), height, width)


def _describe(x: object) -> str:
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return f"{type(x).__name__} of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__


def check_frame(frame: np.ndarray) -> None:
    """ValueError unless `frame` is a uint8 RGB array (H, W, 3)."""
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[-1] != 3:
        raise ValueError(f"expected a uint8 array (H, W, 3), got {_describe(frame)}")
