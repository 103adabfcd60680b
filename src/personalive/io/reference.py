"""The reference portrait as each driver prepares it. The two official scripts prepare it differently, so there are
two functions, each following its own:

- offline (`read_reference_with_face`), as the official offline script: the WHOLE image is the reference (the
  engine squashes it to the model size, no crop), plus a MediaPipe face crop of it for the motion encoder. The
  fidelity tests compare this path with the official script's numbers, so it must not crop.
- online (`frame_reference_around_face`): the official web page crops the centre square in the browser and the
  server resizes it to the model size; we crop the model's aspect ratio around the detected face instead, so a tall
  portrait does not lose the face. The engine finds the online face crops from keypoints.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from personalive.errors import NoFaceError
from personalive.io.faces import FaceCropper, FaceFinder, crop_face
from personalive.io.images import crop_around, load_image


def read_reference_with_face(path: Path, cropper: FaceCropper | None, crop_size: int,
                             image: Image.Image | None = None) -> tuple[Image.Image, torch.Tensor | None]:
    """Read the reference portrait (any mode and size: converted to 8-bit RGB, huge images downscaled; or take
    `image`, read from `path` already) and cut its face crop (3, crop_size, crop_size) in [-1, 1] with `cropper`;
    None without a cropper (keypoint box).

    Raises:
        ImageReadError: missing or undecodable file. NoFaceError: the cropper finds no face in it.
    """
    image = load_image(path) if image is None else image
    if cropper is None:
        return image, None
    pixels = np.asarray(image)
    box = cropper.box_or_raise(pixels, f"the reference image {path}")
    return image, crop_face(pixels, box, crop_size)


def frame_reference_around_face(image: Image.Image, height: int, width: int,
                                faces: FaceFinder | None = None) -> Image.Image:
    """A reference portrait as the online engine will take it: cropped to the target aspect ratio around the face
    (or the middle, without a face finder) and resized to height x width.

    Raises:
        NoFaceError: `faces` finds no face in the image.
    """
    frame = np.asarray(image.convert("RGB"))
    center = None
    if faces is not None and faces.available:
        box = faces.box(frame)
        if box is None:
            raise NoFaceError("no face found in the reference image; use a frontal, well-lit portrait")
        center = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
    return Image.fromarray(crop_around(frame, height, width, center))
