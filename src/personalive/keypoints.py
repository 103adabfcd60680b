"""Implicit-keypoint maths of the pose path: angle decoding, s * x_c R + t, retargeting, canvas drawing, face boxes.

Pure tensor functions (no models, no I/O); device and dtype follow the inputs. Motion parameters travel as an
"info" dict of one row per keypoint set, as returned by `MotionExtractor`:
`pitch`, `yaw`, `roll` ((n, bins) logits or (n,) degrees), `t` (n, 3), `scale` (n, 1), `kp` (n, 3 * num_kp).

Streaming use (official `interpolate_kps_online` for the first chunk, `get_kps` afterwards):

    ref, drv = extractor(ref_256), extractor(frames_256)
    sets = transform_keypoints(start_sets(ref, drv))              # first chunk: 12 ramp sets + len(frames)
    first = extractor(frames_256[:1])                             # kept for the later chunks, as official
    sets = transform_keypoints(retarget(ref, first, extractor(next_frames_256)))   # every later chunk
    boxes = face_boxes(transform_keypoints(drv), 512, 512)        # boxes from the driving frames' own keypoints
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

DRAWN_KEYPOINTS = (1, 2, 3, 4, 12, 15, 20)  # official subset of the 21 keypoints drawn on the pose canvas
COLOURS = ((255, 0, 0), (255, 255, 0), (0, 255, 0), (0, 255, 255), (0, 0, 255), (255, 0, 255), (255, 0, 85))
POSE_KEYS = ("pitch", "yaw", "roll", "t", "scale")

Info = dict[str, torch.Tensor]


def headpose_to_degrees(x: torch.Tensor) -> torch.Tensor:
    """Head-pose bins to degrees: 3 * E[bin index] - 97.5 (66 bins cover [-97.5, 97.5]).

    x: (n, bins) logits -> (n,) degrees, computed in x's dtype; (n,) is taken as already decoded and returned as is.
    """
    if x.ndim == 1:
        return x
    if x.ndim != 2 or x.shape[1] < 2:
        raise ValueError(f"expected (n, bins) logits or (n,) degrees, got {tuple(x.shape)}")
    bins = x.shape[1]
    idx = torch.arange(bins, device=x.device, dtype=x.dtype)
    return torch.softmax(x, dim=1) @ idx * 3 - 1.5 * (bins - 1)  # 97.5 for the official 66 bins


def rotation_matrix(pitch: torch.Tensor, yaw: torch.Tensor, roll: torch.Tensor) -> torch.Tensor:
    """(n,) or (n, 1) angles in degrees -> (n, 3, 3) matrices (Rz @ Ry @ Rx)^T, for row vectors (`kp @ R`).

    Sines and cosines are taken in the angles' dtype; the products run in (at least) fp32 and are returned so,
    as in the official `get_rotation_matrix`.
    """
    dtype = torch.promote_types(pitch.dtype, torch.float32)
    mats = []
    for angle in (pitch, yaw, roll):
        rad = angle.reshape(-1) / 180 * math.pi
        mats.append((torch.cos(rad).to(dtype), torch.sin(rad).to(dtype)))
    (cx, sx), (cy, sy), (cz, sz) = mats
    o, z = torch.ones_like(cx), torch.zeros_like(cx)
    rot_x = torch.stack([o, z, z, z, cx, -sx, z, sx, cx], dim=-1).view(-1, 3, 3)
    rot_y = torch.stack([cy, z, sy, z, o, z, -sy, z, cy], dim=-1).view(-1, 3, 3)
    rot_z = torch.stack([cz, -sz, z, sz, cz, z, z, z, o], dim=-1).view(-1, 3, 3)
    return (rot_z @ rot_y @ rot_x).transpose(1, 2)


def rotation_angles(rot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `rotation_matrix`: (n, 3, 3) row-vector rotations -> (pitch, yaw, roll), each (n,) degrees, with
    yaw in [-90, 90]."""
    a = rot.transpose(1, 2)  # Rz @ Ry @ Rx
    pitch = torch.atan2(a[:, 2, 1], a[:, 2, 2])
    yaw = torch.asin((-a[:, 2, 0]).clamp(-1, 1))
    roll = torch.atan2(a[:, 1, 0], a[:, 0, 0])
    return tuple(x * (180 / math.pi) for x in (pitch, yaw, roll))


def fit_similarity(canonical: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Least-squares s, R, t with points ~ s * canonical @ R + t (Umeyama; R a proper rotation, for row vectors).

    canonical: (k, 3); points: (n, k, 3) -> scale (n, 1), rot (n, 3, 3), t (n, 3).
    """
    c0, p0 = canonical.mean(0), points.mean(1, keepdim=True)
    c, p = canonical - c0, points - p0
    u, sv, vh = torch.linalg.svd(c.T @ p)  # (n, 3, 3): c^T p = U S V^T
    sign = torch.sign(torch.linalg.det(u @ vh))
    d = torch.ones_like(sv)
    d[:, 2] = sign
    rot = u @ torch.diag_embed(d) @ vh
    scale = (sv * d).sum(1, keepdim=True) / c.square().sum()
    t = p0[:, 0] - scale * (c0 @ rot)
    return scale, rot, t


def decode_pose(info: Info) -> Info:
    """Copy of `info` with pitch/yaw/roll as (n,) degrees (decoded together, as the official code does)."""
    n = info["kp"].shape[0]
    angles = headpose_to_degrees(torch.cat([info["pitch"], info["yaw"], info["roll"]]))  # (3n,)
    pitch, yaw, roll = angles.split(n)
    return dict(info, pitch=pitch, yaw=yaw, roll=roll)


def transform_keypoints(info: Info) -> torch.Tensor:
    """Posed keypoints s * (x_c R) + t, translation on x and y only, no expression term.

    info: n keypoint sets (see module docstring) -> (n, num_kp, 3) in the dtype of `info["kp"]`; x and y are
    roughly in [-1, 1] (image coordinates, +y down).
    """
    info = decode_pose(info)
    kp = info["kp"]
    n = kp.shape[0]
    rot = rotation_matrix(info["pitch"], info["yaw"], info["roll"]).to(kp.dtype)
    out = kp.reshape(n, -1, 3) @ rot * info["scale"][:, :, None]
    return torch.cat([out[..., :2] + info["t"][:, None, :2], out[..., 2:]], dim=-1)


def retarget(ref: Info, first: Info, drv: Info, t_scale: float = 0.5) -> Info:
    """Driving motion moved onto the reference (official `get_kps`).

    Absolute driving rotation; translation relative to the first driving frame at `t_scale` gain plus the
    reference's; scale and canonical keypoints of the reference.
    ref, first: one set each; drv: n sets -> n sets with (n,) degree angles.
    """
    drv = decode_pose(drv)
    n = drv["kp"].shape[0]
    return dict(
        drv,
        t=(drv["t"] - first["t"]) * t_scale + ref["t"],
        scale=ref["scale"].expand(n, -1),
        kp=ref["kp"].expand(n, -1),
    )


def ramp(ref: Info, drv0: Info, num: int = 12) -> Info:
    """`num` sets going linearly from the reference pose (alpha = 0, included) towards driving frame 0 retargeted
    onto the reference (alpha = 1, excluded): alpha = k / num, k < num.

    The target has drv0's rotation and the reference's translation and scale (`retarget(ref, drv0, drv0)`), so
    only the angles move. Pose is interpolated in its own dtype, as the official `interpolate_tensors` with
    `linspace(0, 1, num + 1)` minus the last point; canonical keypoints are the reference's.
    ref, drv0: one set each (raw or retargeted) -> num sets.
    """
    ref, target = decode_pose(ref), retarget(ref, drv0, drv0)
    out = {}
    for key in POSE_KEYS:
        a, b = ref[key], target[key]
        alpha = torch.linspace(0, 1, num + 1, device=a.device, dtype=a.dtype).view(-1, *[1] * (a.ndim - 1))
        out[key] = ((1 - alpha) * a + alpha * b)[:-1]
    out["kp"] = ref["kp"].expand(num, -1)
    return out


def concat_info(*infos: Info) -> Info:
    """Keypoint sets one after another (angles must all be logits or all degrees)."""
    return {k: torch.cat([info[k] for info in infos]) for k in infos[0]}


def start_sets(ref: Info, drv: Info, num_ramp: int = 12, t_scale: float = 0.5) -> Info:
    """First chunk (official `interpolate_kps_online`): `ramp(ref, drv[:1])`, then the driving frames retargeted
    with drv's own first row as the translation origin.

    ref: one set; drv: n sets -> num_ramp + n sets with (n,) degree angles.
    """
    drv = decode_pose(drv)  # decoded together, as official (decoding row 0 alone can differ in the last bit)
    drv0 = {k: v[:1] for k, v in drv.items()}
    return concat_info(ramp(ref, drv0, num_ramp), retarget(ref, drv0, drv, t_scale))


def _pixels(kps: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, num_kp, 3) keypoints -> int64 (n, 7) columns and rows of the drawn keypoints (truncated toward 0)."""
    pts = kps[:, list(DRAWN_KEYPOINTS), :2] * 0.5 + 0.5  # in the keypoint dtype, as official
    return (pts[..., 0] * width).long(), (pts[..., 1] * height).long()


def draw_keypoints(kps: torch.Tensor, height: int, width: int, radius: int = 4) -> torch.Tensor:
    """Pose canvas: a filled disc of `radius` px per drawn keypoint, colours added then clipped (official colours).

    kps: (n, num_kp, 3) posed keypoints in [-1, 1] (z ignored) -> (n, 3, height, width) float32 in [0, 1].
    """
    px, py = _pixels(kps, height, width)
    cols = torch.arange(width, device=kps.device)
    rows = torch.arange(height, device=kps.device)[:, None]
    colours = torch.tensor(COLOURS, device=kps.device, dtype=torch.float32) / 255.0  # (7, 3)
    canvas = torch.zeros(kps.shape[0], 3, height, width, device=kps.device, dtype=torch.float32)
    for k, colour in enumerate(colours):  # 7 points; each disc is one vectorised mask over (n, h, w)
        inside = (px[:, k, None, None] - cols) ** 2 + (py[:, k, None, None] - rows) ** 2 <= radius**2
        canvas += colour[:, None, None] * inside[:, None]
    return canvas.clamp(0, 1)


def face_boxes(kps: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Square-ish face box around the drawn keypoints (official `get_boxes`).

    With (cx, cy) the mean pixel of the 7 points and side = 3.4 * (cy - min y): x1, y1 = c - 0.475 side,
    x2, y2 = c + 0.525 side, clipped to the frame and truncated.
    kps: (n, num_kp, 3) -> (n, 4) int64 (x1, y1, x2, y2), end-exclusive pixel bounds.
    """
    px, py = _pixels(kps, height, width)
    cx, cy = px.float().mean(dim=1), py.float().mean(dim=1)
    side = (cy - py.float().amin(dim=1)) * 2.0 * 1.7
    x1 = (cx - side / 2 * 0.95).clamp(0, width - 1)
    y1 = (cy - side / 2 * 0.95).clamp(0, height - 1)
    x2 = (cx + side / 2 * 1.05).clamp(0, width - 1)
    y2 = (cy + side / 2 * 1.05).clamp(0, height - 1)
    return torch.stack([x1, y1, x2, y2], dim=1).long()


def _span(lo: int, hi: int, limit: int, min_side: int) -> tuple[int, int]:
    """[lo, hi) clipped to [0, limit]; if shorter than min_side, grown around its centre and kept inside."""
    lo, hi = min(max(lo, 0), limit), min(max(hi, 0), limit)
    if hi - lo >= min_side:
        return lo, hi
    logger.debug("face box span [%d, %d) shorter than %d px; grown around its centre", lo, hi, min_side)
    lo = min(max((lo + hi - min_side) // 2, 0), limit - min_side)
    return lo, lo + min_side


def crop_faces(
    frames: torch.Tensor, boxes: torch.Tensor, size: int = 224, min_side: int | None = None
) -> torch.Tensor:
    """Crop each frame to its box and resize (bilinear, align_corners=False, no antialias), as official.

    Unlike the official code, a box narrower or shorter than `min_side` px (default max(2, min(H, W) // 64)), or
    empty, is grown around its centre to that size inside the frame, so a degenerate box still gives a crop.
    frames: (n, c, H, W) in [-1, 1]; boxes: (n, 4) int (x1, y1, x2, y2) in the frames' pixels -> (n, c, size, size).
    """
    if frames.ndim != 4 or boxes.shape != (frames.shape[0], 4):
        raise ValueError(
            f"expected (n, c, H, W) frames and (n, 4) boxes, got {tuple(frames.shape)}, {tuple(boxes.shape)}"
        )
    height, width = frames.shape[-2:]
    min_side = min(min_side or max(2, min(height, width) // 64), height, width)
    crops = []
    for frame, (x1, y1, x2, y2) in zip(frames, boxes.tolist(), strict=True):
        (x1, x2), (y1, y2) = _span(x1, x2, width, min_side), _span(y1, y2, height, min_side)
        crop = frame[None, :, y1:y2, x1:x2]
        crops.append(F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False))
    return torch.cat(crops)
