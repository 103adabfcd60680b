"""Keypoint maths on hand-computed cases: angle decoding, rotations, transform, retargeting, canvas, boxes, crops."""

import pytest
import torch
import torch.nn.functional as F

from personalive import keypoints as kp


def info(n=1, seed=0, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {k: torch.randn(n, 66, generator=g) for k in ("pitch", "yaw", "roll")}
    out.update(
        t=torch.randn(n, 3, generator=g), scale=torch.rand(n, 1, generator=g) + 0.5, kp=torch.randn(n, 63, generator=g)
    )
    return {k: v.to(dtype) for k, v in out.items()}


def posed(n=1, points=None) -> torch.Tensor:
    """(n, 21, 3) keypoints all far off-canvas, except `points` {index: (x, y)}."""
    kps = torch.full((n, 21, 3), 5.0)
    for i, (x, y) in (points or {}).items():
        kps[:, i, 0], kps[:, i, 1] = x, y
    return kps


# ---------------------------------------------------------------------------------------------------------------
# angles and rotations


def test_headpose_known_distribution():
    probs = torch.zeros(1, 66)
    probs[0, 10], probs[0, 20] = 0.25, 0.75  # E[bin] = 17.5 -> 17.5 * 3 - 97.5 = -45
    torch.testing.assert_close(kp.headpose_to_degrees(probs.log()), torch.tensor([-45.0]))
    one_hot = torch.full((2, 66), -1e4)
    one_hot[0, 0], one_hot[1, 65] = 0, 0
    torch.testing.assert_close(kp.headpose_to_degrees(one_hot), torch.tensor([-97.5, 97.5]))
    degrees = torch.tensor([1.0, 2.0])
    assert kp.headpose_to_degrees(degrees) is degrees  # already decoded
    assert kp.headpose_to_degrees(one_hot.half()).dtype == torch.float16


def test_rotations_by_90_degrees():
    zero, ninety = torch.zeros(1), torch.full((1,), 90.0)
    e = torch.eye(3)  # rows: x, y, z unit points (row vectors, rotated as p @ R)
    cases = {  # (pitch, yaw, roll): images of x, y, z
        (90, 0, 0): [[1, 0, 0], [0, 0, 1], [0, -1, 0]],
        (0, 90, 0): [[0, 0, -1], [0, 1, 0], [1, 0, 0]],
        (0, 0, 90): [[0, 1, 0], [-1, 0, 0], [0, 0, 1]],
    }
    for (p, y, r), expected in cases.items():
        rot = kp.rotation_matrix(*(ninety if a else zero for a in (p, y, r)))
        torch.testing.assert_close(e @ rot[0], torch.tensor(expected, dtype=torch.float32), atol=1e-6, rtol=0)
    # composition order: R = (Rz Ry Rx)^T, i.e. pitch first, then yaw, then roll (column vectors)
    rot = kp.rotation_matrix(ninety, ninety, zero)[0]
    torch.testing.assert_close(torch.tensor([0.0, 1, 0]) @ rot, torch.tensor([1.0, 0, 0]), atol=1e-6, rtol=0)


def test_rotation_is_orthonormal_and_fp32_for_half_angles():
    angles = torch.randn(3, 5) * 60
    rot = kp.rotation_matrix(*angles)
    torch.testing.assert_close(rot @ rot.transpose(1, 2), torch.eye(3).expand(5, 3, 3), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.linalg.det(rot), torch.ones(5))
    assert kp.rotation_matrix(*angles.half()).dtype == torch.float32


def test_transform_keypoints_by_hand():
    points = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1]] + [[0, 0, 0]] * 18).reshape(1, 63)
    sets = dict(
        pitch=torch.zeros(1),
        yaw=torch.full((1,), 90.0),
        roll=torch.zeros(1),
        t=torch.tensor([[0.1, -0.2, 5.0]]),
        scale=torch.tensor([[2.0]]),
        kp=points,
    )
    out = kp.transform_keypoints(sets)
    assert out.shape == (1, 21, 3)
    # yaw 90: x -> -z, z -> x; then * 2, then + t on x and y only (t_z ignored)
    expected = torch.tensor([[0.1, -0.2, -2.0], [0.1, 1.8, 0.0], [2.1, -0.2, 0.0], [0.1, -0.2, 0.0]])
    torch.testing.assert_close(out[0, :4], expected, atol=1e-6, rtol=0)
    assert kp.transform_keypoints(info(2, dtype=torch.float16)).dtype == torch.float16


# ---------------------------------------------------------------------------------------------------------------
# retargeting


def test_retarget_keeps_reference_scale_and_kp_and_halves_relative_translation():
    ref, first, drv = info(1, 0), info(1, 1), info(4, 2)
    out = kp.retarget(ref, first, drv)
    torch.testing.assert_close(out["t"], (drv["t"] - first["t"]) * 0.5 + ref["t"])
    assert torch.equal(out["scale"], ref["scale"].expand(4, 1)) and torch.equal(out["kp"], ref["kp"].expand(4, 63))
    for key in ("pitch", "yaw", "roll"):  # absolute driving rotation
        torch.testing.assert_close(out[key], kp.headpose_to_degrees(drv[key]))
    # same pose as the driving frames up to scale/translation: rotations match
    own = kp.transform_keypoints(dict(drv, kp=ref["kp"].expand(4, 63), scale=torch.ones(4, 1), t=torch.zeros(4, 3)))
    mine = kp.transform_keypoints(dict(out, scale=torch.ones(4, 1), t=torch.zeros(4, 3)))
    torch.testing.assert_close(mine, own)


def test_start_sets_ramp_from_reference_pose():
    ref, drv = info(1, 0), info(4, 2)
    sets = kp.start_sets(ref, drv)
    assert {k: tuple(v.shape) for k, v in sets.items()} == {
        "pitch": (16,),
        "yaw": (16,),
        "roll": (16,),
        "t": (16, 3),
        "scale": (16, 1),
        "kp": (16, 63),
    }
    posed_sets = kp.transform_keypoints(sets)
    torch.testing.assert_close(posed_sets[0], kp.transform_keypoints(ref)[0])  # alpha = 0: the reference itself
    torch.testing.assert_close(sets["t"][:13], ref["t"].expand(13, 3))  # ramp and driving frame 0 sit at t_ref
    torch.testing.assert_close(sets["t"][12:], (drv["t"] - drv["t"][:1]) * 0.5 + ref["t"])
    torch.testing.assert_close(sets["scale"], ref["scale"].expand(16, 1))  # the ramp lerps s_ref to s_ref
    assert torch.equal(sets["scale"][12:], ref["scale"].expand(4, 1))
    p_ref, p_drv = kp.headpose_to_degrees(ref["pitch"]), kp.headpose_to_degrees(drv["pitch"])[0]
    torch.testing.assert_close(sets["pitch"][:12], p_ref + torch.arange(12) / 12 * (p_drv - p_ref))
    torch.testing.assert_close(sets["pitch"][12], p_drv)
    # ramp() alone takes a raw driving frame: only the angles move
    head = kp.ramp(ref, {k: v[:1] for k, v in drv.items()}, num=12)
    for k in head:
        torch.testing.assert_close(head[k], sets[k][:12])


# ---------------------------------------------------------------------------------------------------------------
# canvas, boxes, crops


def disc(cx, cy, r, h, w):
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return (cols - cx) ** 2 + (rows - cy) ** 2 <= r * r


def test_draw_one_point_at_the_centre():
    canvas = kp.draw_keypoints(posed(points={1: (0.0, 0.0)}), 64, 64)  # keypoint 1 is drawn red
    assert canvas.shape == (1, 3, 64, 64) and canvas.dtype == torch.float32
    lit = canvas[0, 0] > 0
    assert int(lit.sum()) == 49  # integer points with dx^2 + dy^2 <= 16
    assert torch.equal(lit, disc(32, 32, 4, 64, 64))
    assert torch.equal(canvas[0, 0][lit], torch.ones(49)) and not canvas[0, 1:].any()


def test_draw_colours_add_and_saturate():
    x = (10 / 64 - 0.5) * 2  # pixel 10 exactly
    canvas = kp.draw_keypoints(posed(points={20: (x, x), 12: (0.0, 0.0), 1: (0.0, 0.0), 2: (0.0, 0.0)}), 64, 64)[0]
    at_20, at_centre = canvas[:, 10, 10], canvas[:, 32, 32]
    torch.testing.assert_close(at_20, torch.tensor([1.0, 0.0, 85 / 255]))  # (255, 0, 85) alone
    assert torch.equal(at_centre, torch.ones(3))  # red + yellow + blue: red clipped at 1
    assert canvas.max() == 1 and canvas.min() == 0


def test_draw_truncates_toward_zero_and_scales_per_axis():
    canvas = kp.draw_keypoints(posed(points={1: (0.249, -0.99)}), 32, 100, radius=0)[0, 0]
    # x: (0.249 * 0.5 + 0.5) * 100 = 62.45 -> 62; y: 0.005 * 32 = 0.16 -> 0
    assert canvas.nonzero().tolist() == [[0, 62]]
    left = kp.draw_keypoints(posed(points={1: (-1.01, -0.99)}), 32, 100, radius=0)[0, 0]
    assert left.nonzero().tolist() == [[0, 0]]  # x: -0.5 px truncates to 0 (a floor would be off-canvas)


def test_face_boxes_formula():
    to_x = lambda p: p / 64 - 1  # noqa: E731  exact pixel p on a 128 canvas
    xs, ys = [40, 50, 60, 70, 80, 60, 60], [40, 50, 60, 70, 80, 60, 60]
    points = dict(zip(kp.DRAWN_KEYPOINTS, [(to_x(x), to_x(y)) for x, y in zip(xs, ys, strict=True)], strict=True))
    kps = posed(points=points)
    # centre (60, 60), min y 40, side = 3.4 * 20 = 68: 60 - 32.3 = 27.7 -> 27, 60 + 35.7 = 95.7 -> 95
    assert kp.face_boxes(kps, 128, 128).tolist() == [[27, 27, 95, 95]]
    shifted = posed(
        points={
            i: (to_x(x + 50), to_x(y)) for i, (x, y) in zip(kp.DRAWN_KEYPOINTS, zip(xs, ys, strict=True), strict=True)
        }
    )
    # centre x 110: x1 = 77.7 -> 77, x2 = 145.7 clipped to 127
    assert kp.face_boxes(shifted, 128, 128).tolist() == [[77, 27, 127, 95]]
    assert kp.face_boxes(kps, 128, 128).dtype == torch.int64


def test_crop_faces_ordinary_box_is_the_official_slice_and_resize():
    frames = torch.rand(2, 3, 64, 64) * 2 - 1
    boxes = torch.tensor([[5, 7, 45, 50], [0, 0, 64, 64]])
    out = kp.crop_faces(frames, boxes, size=32)
    expected = F.interpolate(frames[:1, :, 7:50, 5:45], size=(32, 32), mode="bilinear", align_corners=False)
    assert out.shape == (2, 3, 32, 32)
    assert torch.equal(out[:1], expected)
    assert torch.equal(out[1:], F.interpolate(frames[1:], size=(32, 32), mode="bilinear", align_corners=False))


@pytest.mark.parametrize(
    ("box", "grown"),
    [
        ((10, 10, 10, 40), (8, 10, 12, 40)),  # x2 <= x1: grown to min_side = 4 px around x = 10
        ((30, 20, 25, 21), (25, 18, 29, 22)),  # inverted and 1 px tall
        ((63, 0, 63, 0), (60, 0, 64, 4)),  # empty, at the corner: kept inside the frame
    ],
)
def test_crop_faces_degenerate_box_is_grown(box, grown):
    frames = torch.rand(1, 3, 64, 64) * 2 - 1
    out = kp.crop_faces(frames, torch.tensor([box]), size=16, min_side=4)
    x1, y1, x2, y2 = grown
    expected = F.interpolate(frames[:, :, y1:y2, x1:x2], size=(16, 16), mode="bilinear", align_corners=False)
    assert out.shape == (1, 3, 16, 16) and torch.isfinite(out).all()
    assert torch.equal(out, expected)
    assert kp.crop_faces(frames, torch.tensor([box]), size=16).shape == (1, 3, 16, 16)  # default minimum


def test_rotation_angles_invert_rotation_matrix():
    angles = torch.tensor([[10.0, -35.0, 80.0], [-120.0, 60.0, -5.0], [0.0, 0.0, 0.0]])
    rot = kp.rotation_matrix(*angles.T)
    back = torch.stack(kp.rotation_angles(rot), dim=1)
    assert torch.allclose(back, angles, atol=1e-4)


def test_fit_similarity_recovers_scale_rotation_translation():
    canonical = torch.randn(21, 3, generator=torch.Generator().manual_seed(0))
    scale, angles, t = torch.tensor([[0.5], [2.0]]), torch.tensor([[20.0, -10.0, 5.0], [-30.0, 40.0, 170.0]]), torch.randn(2, 3)
    points = scale[:, :, None] * canonical @ kp.rotation_matrix(*angles.T) + t[:, None]
    s, rot, shift = kp.fit_similarity(canonical, points)
    assert torch.allclose(s, scale, atol=1e-5) and torch.allclose(shift, t, atol=1e-5)
    assert torch.allclose(torch.stack(kp.rotation_angles(rot), dim=1), angles, atol=1e-3)
    mirrored = points * torch.tensor([-1.0, 1.0, 1.0])  # no rotation fits a reflection: still a proper one
    assert torch.allclose(torch.linalg.det(kp.fit_similarity(canonical, mirrored)[1]), torch.ones(2), atol=1e-5)
