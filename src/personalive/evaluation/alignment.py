"""Face alignment for ArcFace (ID-SIM): five landmarks from MediaPipe FaceMesh, a similarity transform onto
insightface's 112 x 112 ArcFace template, bilinear warp.

The five points are, in image order (left to right as seen): the centre of the left-hand eye (mean of its two
corners), the centre of the right-hand eye, the nose tip, the left-hand and the right-hand mouth corner; the
template is insightface's `arcface_dst`, the layout its recognition models were trained on. A frame where
MediaPipe finds no face reuses the last alignment found in the same video; before any, the whole frame is resized
(both are counted, see `FaceAligner.missed`).
"""

from __future__ import annotations

import logging

import numpy as np
from skimage.transform import SimilarityTransform, resize, warp

from personalive.errors import BackendUnavailableError
from personalive.io.faces import MEDIAPIPE_PIN, FaceCropper, mediapipe_available

logger = logging.getLogger(__name__)

ARCFACE_SIZE = 112
# insightface `arcface_dst`: eye, eye, nose tip, mouth corner, mouth corner in a 112 x 112 crop
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
                             [70.7299, 92.2041]])
# MediaPipe FaceMesh indices averaged into each of the 5 points (image-left eye corners, image-right eye corners,
# nose tip, image-left mouth corner, image-right mouth corner)
MESH_POINTS = ((33, 133), (362, 263), (1,), (61,), (291,))


def align_face(frame: np.ndarray, points: np.ndarray, size: int = ARCFACE_SIZE) -> np.ndarray:
    """Warp a face onto the ArcFace template.

    frame: uint8 (H, W, 3); points: (5, 2) pixel (x, y) in template order -> uint8 (size, size, 3), zero outside.
    """
    transform = similarity_to_template(points, size)
    out = warp(frame, transform.inverse, output_shape=(size, size), order=1, mode="constant", cval=0.0,
               preserve_range=True)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def similarity_to_template(points: np.ndarray, size: int = ARCFACE_SIZE) -> SimilarityTransform:
    """Least-squares similarity (rotation, uniform scale, translation) taking `points` (5, 2) to the template."""
    points = np.asarray(points, dtype=np.float64)
    if points.shape != (5, 2):
        raise ValueError(f"expected (5, 2) landmarks, got {points.shape}")
    transform = SimilarityTransform.from_estimate(points, ARCFACE_TEMPLATE * (size / ARCFACE_SIZE))
    if not transform:
        raise ValueError(f"cannot fit a similarity transform to landmarks {points.tolist()}")
    return transform


class FaceAligner:
    """Aligned faces of the frames of one video after another (call `reset()` between videos).

    `__call__(frames)` -> uint8 (n, size, size, 3). Frames without a detected face: see the module docstring;
    `missed` counts them since the last `reset()`, `total` counts all frames.

    Raises:
        BackendUnavailableError: mediapipe is missing or too new (ID-SIM is then skipped by the caller).
    """

    def __init__(self, size: int = ARCFACE_SIZE, min_detection_confidence: float = 0.5):
        if not mediapipe_available():
            raise BackendUnavailableError(f"face alignment for ID-SIM needs mediapipe; run `pip install {MEDIAPIPE_PIN}`")
        self.size = size
        self._cropper = FaceCropper(min_detection_confidence=min_detection_confidence)
        self.reset()

    def reset(self) -> None:
        self.last: np.ndarray | None = None
        self.missed = self.total = 0

    def landmarks(self, frame: np.ndarray) -> np.ndarray | None:
        """The 5 points (5, 2) of a uint8 RGB frame (H, W, 3), or None without a face."""
        mesh = self._cropper.landmarks(frame)
        if mesh is None:
            return None
        h, w = frame.shape[:2]
        return np.array([mesh[list(ids), :2].mean(0) * (w, h) for ids in MESH_POINTS])

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        out = []
        for frame in frames:
            points = self.landmarks(frame)
            self.total += 1
            if points is None:
                self.missed += 1
                points = self.last
            else:
                self.last = points
            if points is None:
                whole = resize(frame, (self.size, self.size), order=1, preserve_range=True, anti_aliasing=True)
                out.append(np.clip(np.rint(whole), 0, 255).astype(np.uint8))
            else:
                out.append(align_face(frame, points, self.size))
        return np.stack(out)

    def close(self) -> None:
        self._cropper.close()
