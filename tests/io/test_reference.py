"""The reference portrait as each driver prepares it: offline the whole image plus its face crop, online the model's
aspect ratio cropped around the face."""

import numpy as np
import pytest
from PIL import Image

from personalive.errors import NoFaceError
from personalive.io.faces import FaceCropper, FaceFinder, mediapipe_available
from personalive.io.images import load_image
from personalive.io.reference import frame_reference_around_face, read_reference_with_face
from personalive.io.samples import sample_reference

needs_mediapipe = pytest.mark.skipif(not mediapipe_available(), reason="mediapipe is not installed")


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return load_image(sample_reference())


# -------------------------------------------------------------------------------------------------------- offline
def test_offline_reference_is_the_whole_image(tmp_path):
    path = tmp_path / "tall.png"
    Image.new("RGB", (40, 90), "red").save(path)
    reference, face = read_reference_with_face(path, None, 64)  # no cropper: keypoint boxes later
    assert reference.size == (40, 90) and face is None


@needs_mediapipe
@pytest.mark.parametrize("kind", ["grey16", "rgba", "palette", "huge"])
def test_references_of_any_mode_and_size_are_converted(tmp_path, astronaut, kind):
    if kind == "grey16":
        pixels = (np.asarray(astronaut.convert("L"), np.uint16) * 257)
        image, path = Image.fromarray(pixels, mode="I;16"), tmp_path / "grey16.png"
    elif kind == "rgba":
        image, path = astronaut.convert("RGBA"), tmp_path / "rgba.png"
    elif kind == "palette":
        image, path = astronaut.convert("P"), tmp_path / "palette.png"
    else:
        image, path = astronaut.resize((4400, 4400)), tmp_path / "huge.jpg"
    image.save(path)
    with FaceCropper() as cropper:
        reference, face = read_reference_with_face(path, cropper, 64)
    assert reference.mode == "RGB" and max(reference.size) <= 4096
    assert face.shape == (3, 64, 64) and face.std() > 0.05


# --------------------------------------------------------------------------------------------------------- online
class FixedFaces:
    available = True

    def __init__(self, box):
        self._box = box

    def box(self, frame):
        return self._box


def test_frame_reference_around_face_crops_around_the_face_or_refuses():
    image = Image.new("RGB", (120, 60))
    out = frame_reference_around_face(image, 32, 32, FixedFaces((90, 10, 110, 30)))
    assert out.size == (32, 32)
    with pytest.raises(NoFaceError, match="no face"):
        frame_reference_around_face(image, 32, 32, FixedFaces(None))
    assert frame_reference_around_face(image, 32, 32, None).size == (32, 32)  # no face finder: middle crop


@pytest.mark.slow
def test_frame_reference_around_face_with_mediapipe_on_the_sample_portrait():
    pytest.importorskip("mediapipe")

    faces = FaceFinder()
    try:
        assert frame_reference_around_face(load_image(sample_reference()), 64, 64, faces).size == (64, 64)
        with pytest.raises(NoFaceError):
            frame_reference_around_face(Image.new("RGB", (128, 128), "gray"), 64, 64, faces)
    finally:
        faces.close()
