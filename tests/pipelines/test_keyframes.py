"""The keyframe distance rule: L2 over the flattened motion tokens against every row of the bank."""

import torch

from personalive.pipelines.keyframes import far_from_bank


def test_a_frame_is_far_only_when_far_from_every_row():
    tokens = torch.zeros(4, 2)  # (m, d)
    bank = torch.stack([torch.full((8,), 3.0), torch.zeros(8)])  # (k, m * d): the reference, one keyframe
    assert not far_from_bank(tokens, bank, 0.5)  # the keyframe is at distance 0
    assert far_from_bank(tokens, bank[:1], 0.5)  # the reference alone: sqrt(8 * 9) = 8.49 away
    assert far_from_bank(tokens, bank[:1], 8.4) and not far_from_bank(tokens, bank[:1], 8.5)
    three = torch.zeros(1, 8)
    three[0, 5] = 3.0
    assert not far_from_bank(tokens, three, 3.0) and far_from_bank(tokens, three, 2.99)  # strictly farther
    assert far_from_bank(tokens.to(torch.bfloat16), bank[:1], 8.4)  # any float dtype
