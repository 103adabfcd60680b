"""Face crops for the motion encoder, made the way the official offline script makes them.

MediaPipe FaceMesh (static image mode, one face) finds 468 landmarks; their bounding box, grown to a square of side
1.1 x its longer side around its centre and clipped to the image, is the face box. The crop is resized with
diffusers' `VaeImageProcessor` (PIL Lanczos, then x / 255 * 2 - 1), as the official pipeline does at 224 x 224.

mediapipe is optional: without it `FaceCropper` refuses to start and callers use keypoint boxes; `crop_face`
works either way. `FaceFinder` shares one cropper between threads (the web page's reference checks).
"""

from __future__ import annotations

import importlib.util
import logging
import threading

import numpy as np
import torch

from personalive.errors import BackendUnavailableError, NoFaceError
from personalive.io.images import check_frame, resize_to_tensor
from personalive.io.native_logs import quiet_native_logs

logger = logging.getLogger(__name__)

Box = tuple[int, int, int, int]  # (x1, y1, x2, y2) in pixels; x2, y2 exclusive (numpy slice bounds)

BOX_SCALE = 1.1  # official `scale_bb(face_box, scale=1.1, ...)`
MIN_CROP = 8  # px; a smaller (degenerate) box is grown around its centre to this side
CROP_SIZE = 224  # motion encoder input side (`MotionEncoderConfig.image_size`)
WARM_UP_SIDE = 64  # px; a blank frame run once at start-up, while the graph's native log lines are held back
MEDIAPIPE_PIN = "mediapipe==0.10.21"  # the newest release that still ships `mediapipe.solutions.face_mesh`


def mediapipe_available() -> bool:
    """Whether mediapipe is installed (checked without importing it)."""
    return importlib.util.find_spec("mediapipe") is not None


class FaceCropper:
    """Face boxes from MediaPipe FaceMesh, one frame at a time. Not thread-safe: use one per thread.

    Example:
        with FaceCropper() as cropper:
            box = cropper.box(frame)
            face = cropper.crop(frame, box, 224) if box is not None else None

    Raises:
        BackendUnavailableError: mediapipe is missing, or too new to have `solutions.face_mesh`.
    """

    def __init__(self, scale: float = BOX_SCALE, min_detection_confidence: float = 0.5):
        if not mediapipe_available():
            raise BackendUnavailableError(
                f"mediapipe is not installed; run `pip install {MEDIAPIPE_PIN}` or use keypoint face boxes"
            )
        with quiet_native_logs():
            import mediapipe  # slow to import, so only when asked for

            face_mesh = getattr(getattr(mediapipe, "solutions", None), "face_mesh", None)
            if face_mesh is None:
                raise BackendUnavailableError(
                    f"mediapipe {getattr(mediapipe, '__version__', '?')} has no "
                    f"solutions.face_mesh; run `pip install {MEDIAPIPE_PIN}`"
                )
            self.scale = scale
            self._mesh = face_mesh.FaceMesh(
                static_image_mode=True, max_num_faces=1, min_detection_confidence=min_detection_confidence
            )
            # the graph starts its models on its own threads, which log as they go: one frame waits for them
            self._mesh.process(np.zeros((WARM_UP_SIDE, WARM_UP_SIDE, 3), np.uint8))

    def landmarks(self, frame: np.ndarray) -> np.ndarray | None:
        """FaceMesh's 468 landmarks of a uint8 RGB frame (H, W, 3) as float64 (468, 3): x / W, y / H and MediaPipe's
        relative depth z (about x's scale, smaller is nearer); None if no face is found."""
        check_frame(frame)
        with quiet_native_logs():  # MediaPipe's C++ logging, on the first frame of each graph
            result = self._mesh.process(np.ascontiguousarray(frame))
        if not result.multi_face_landmarks:
            return None
        return np.array([(p.x, p.y, p.z) for p in result.multi_face_landmarks[0].landmark])

    def box(self, frame: np.ndarray) -> Box | None:
        """Square face box of a uint8 RGB frame (H, W, 3), or None if no face is found."""
        landmarks = self.landmarks(frame)
        if landmarks is None:
            return None
        h, w = frame.shape[:2]
        xs, ys = (landmarks[:, 0] * w).astype(int), (landmarks[:, 1] * h).astype(int)  # official: int(l.x * w)
        return scale_box((xs.min(), ys.min(), xs.max(), ys.max()), self.scale, h, w)

    def box_or_raise(self, frame: np.ndarray, where: str) -> Box:
        """`box`, but a frame without a face raises NoFaceError naming `where` (e.g. "frame 12 of drive.mp4")."""
        box = self.box(frame)
        if box is None:
            raise NoFaceError(f"no face found in {where}; use a frontal, well-lit face that fills part of the frame")
        return box

    @staticmethod
    def crop(frame: np.ndarray, box: Box, size: int = CROP_SIZE) -> torch.Tensor:
        """`crop_face`; needs no mediapipe, so `FaceCropper.crop(frame, box, size)` works without an instance."""
        return crop_face(frame, box, size)

    def close(self) -> None:
        with quiet_native_logs():
            self._mesh.close()

    def __enter__(self) -> FaceCropper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FaceFinder:
    """Face boxes for reference checks, shared by the request threads (one MediaPipe FaceMesh behind a lock).

    Without mediapipe, `available` is False and references are taken without a face check.
    """

    def __init__(self):
        self.available = mediapipe_available()
        self._cropper: FaceCropper | None = None
        self._lock = threading.Lock()
        if not self.available:
            logger.warning("mediapipe is not installed: reference portraits are not checked for a face")

    def box(self, frame: np.ndarray) -> tuple[int, int, int, int] | None:
        """Face box (x1, y1, x2, y2) of a uint8 RGB frame (H, W, 3), or None if there is no face."""
        with self._lock:
            if self._cropper is None:
                self._cropper = FaceCropper()
            return self._cropper.box(frame)

    def close(self) -> None:
        with self._lock:
            if self._cropper is not None:
                self._cropper.close()
                self._cropper = None


def scale_box(box: tuple[float, float, float, float], scale: float, height: int, width: int) -> Box:
    """Square of side `scale` x the longer side of `box`, same centre, clipped to the image (official `scale_bb`).

    Like the official code, the right/bottom edges are clipped to width - 1 / height - 1, and the float corners are
    truncated to ints when used as slice bounds.
    """
    x1, y1, x2, y2 = box
    side = max(x2 - x1, y2 - y1) * scale
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    left, top = max(0.0, cx - side / 2), max(0.0, cy - side / 2)
    right, bottom = min(width - 1.0, cx + side / 2), min(height - 1.0, cy + side / 2)
    return int(left), int(top), int(right), int(bottom)


def crop_face(frame: np.ndarray, box: Box, size: int = CROP_SIZE) -> torch.Tensor:
    """Crop `box` from a uint8 RGB frame (H, W, 3) -> float32 tensor (3, size, size) in [-1, 1].

    The box is clipped to the frame; a box smaller than MIN_CROP px (or empty, or inverted) is grown around its
    centre, so any box gives a crop.
    """
    check_frame(frame)
    h, w = frame.shape[:2]
    x1, x2 = _span(box[0], box[2], w)
    y1, y2 = _span(box[1], box[3], h)
    return resize_to_tensor(frame[y1:y2, x1:x2], size, size)


def _span(start: float, end: float, length: int) -> tuple[int, int]:
    """Integer [start, end) inside [0, length), at least min(MIN_CROP, length) long."""
    start, end = sorted((int(start), int(end)))
    start, end = min(max(start, 0), length), min(max(end, 0), length)
    need = min(MIN_CROP, length)
    if end - start < need:
        centre = (start + end) // 2
        start = min(max(centre - need // 2, 0), length - need)
        end = start + need
    return start, end

