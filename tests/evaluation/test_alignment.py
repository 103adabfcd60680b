"""ArcFace alignment: the similarity transform onto the template, and MediaPipe's five points on a real face."""

import numpy as np
import pytest
from PIL import Image

from personalive.evaluation.alignment import ARCFACE_TEMPLATE, FaceAligner, align_face, similarity_to_template
from personalive.io.faces import mediapipe_available


def test_points_on_the_template_give_the_identity_crop():
    frame = np.random.default_rng(0).integers(0, 256, (150, 130, 3), dtype=np.uint8)
    assert np.array_equal(align_face(frame, ARCFACE_TEMPLATE), frame[:112, :112])


def test_a_rotated_scaled_shifted_face_is_undone():
    angle, scale, shift = np.deg2rad(30), 2.0, np.array([40.0, 25.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = ARCFACE_TEMPLATE @ rot.T * scale + shift  # where the face sits in the frame
    transform = similarity_to_template(points)
    assert np.allclose(transform(points), ARCFACE_TEMPLATE, atol=1e-9)
    assert transform.scale == pytest.approx(1 / scale) and transform.rotation == pytest.approx(-angle)
    assert np.allclose(similarity_to_template(points, 224)(points), ARCFACE_TEMPLATE * 2, atol=1e-9)


def test_bad_landmarks_are_refused():
    with pytest.raises(ValueError, match=r"\(5, 2\)"):
        similarity_to_template(np.zeros((4, 2)))


@pytest.mark.skipif(not mediapipe_available(), reason="mediapipe is not installed")
def test_mediapipe_points_and_fallbacks():
    from personalive.io.samples import sample_reference

    face = np.asarray(Image.open(sample_reference()).convert("RGB"))  # scikit-image's astronaut
    aligner = FaceAligner()
    try:
        points = aligner.landmarks(face)
        eye_l, eye_r, nose, mouth_l, mouth_r = points
        assert eye_l[0] < eye_r[0] and mouth_l[0] < mouth_r[0]  # image order, left to right
        assert max(eye_l[1], eye_r[1]) < nose[1] < min(mouth_l[1], mouth_r[1])  # eyes, nose, mouth downwards
        blank = np.zeros_like(face)
        out = aligner(np.stack([blank, face, blank]))  # no face yet: whole frame; then the last alignment reused
        assert out.shape == (3, 112, 112, 3) and (aligner.missed, aligner.total) == (2, 3)
        assert np.array_equal(out[2], align_face(blank, points))
        assert np.array_equal(out[1], align_face(face, points))
        aligner.reset()
        assert aligner.missed == 0 and aligner.last is None
    finally:
        aligner.close()
