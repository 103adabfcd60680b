"""The historical-keyframe rule of streaming (paper, "historical keyframe mechanism"; official `keyframe_threshold`).

When a frame leaves the streaming window, its motion tokens are compared with those of the reference and of every
keyframe taken so far; a frame farther than the threshold from all of them (L2 over the flattened tokens) becomes a
keyframe: the reference UNet re-runs on its clean latent and its tokens join the reference attention, up to a cap.
One pure function, shared by inference and by stage 3 of training, so both decide alike.
"""

from __future__ import annotations

import torch


def far_from_bank(tokens: torch.Tensor, bank: torch.Tensor, threshold: float) -> bool:
    """Is a frame's motion far from every motion in the bank?

    Args:
        tokens: (m, d) (or any shape of m * d elements) motion tokens of one frame, any float dtype.
        bank: (k, m * d) flattened motion tokens of the reference and of every keyframe so far (k >= 1), float32.
        threshold: the L2 distance (over the m * d flattened values) a frame must exceed to all of them.
    Returns:
        True when the L2 distance from `tokens` to its nearest row of `bank` is greater than `threshold`.
    """
    distance = torch.cdist(tokens.flatten()[None].float(), bank.float()).min()
    return bool(distance > threshold)
