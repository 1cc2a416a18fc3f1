"""Issue 27's first pieces: the seeded orthogonal projection of teacher hidden states and the
int8 codec of the projected features."""

import numpy as np
import pytest
import torch

from distill.teacher.features import orthogonal_projection, project
from storage.codec import decode_features, encode_features


def test_projection_is_orthonormal_and_reproducible():
    p = orthogonal_projection(576, 256, seed=3)
    assert p.shape == (576, 256) and p.dtype == torch.float32
    torch.testing.assert_close(p.T @ p, torch.eye(256), atol=1e-5, rtol=0)
    assert torch.equal(p, orthogonal_projection(576, 256, seed=3))
    assert not torch.equal(p, orthogonal_projection(576, 256, seed=4))
    # a vector in the projection's span keeps its norm; a random one keeps about dim / H of its square
    x = p @ torch.randn(256, generator=torch.Generator().manual_seed(0))
    assert project(x, p).norm().item() == pytest.approx(x.norm().item(), rel=1e-5)
    h = torch.randn(2000, 576, generator=torch.Generator().manual_seed(1))
    share = (project(h, p).norm(dim=-1) ** 2 / h.norm(dim=-1) ** 2).mean().item()
    assert share == pytest.approx(256 / 576, rel=0.02)


def test_projection_refuses_a_dim_above_the_hidden_size_and_mismatched_states():
    with pytest.raises(ValueError, match=r"dim=600 must be in \[1, 576\]"):
        orthogonal_projection(576, 600)
    with pytest.raises(ValueError, match="hidden states of size 64 for a projection from 576"):
        project(torch.zeros(3, 64), orthogonal_projection(576, 8))


def test_feature_codec_round_trips_within_half_a_step_in_260_bytes_per_position():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 256)).astype(np.float32) * rng.uniform(0.01, 50, (64, 1)).astype(np.float32)
    x[5] = 0.0  # an all-zero position
    scales, codes = encode_features(x)
    assert scales.dtype == np.float32 and codes.dtype == np.int8 and codes.shape == x.shape
    back = decode_features(scales, codes)
    assert (np.abs(back - x) <= scales[:, None] / 2 * (1 + 1e-6) + 1e-30).all()
    assert (back[5] == 0).all() and scales[5] == 0
    assert np.abs(codes).max() == 127  # each row uses the whole range
    assert scales.nbytes / len(x) + codes.nbytes / len(x) == 260  # at most 300 per position and layer
    with pytest.raises(ValueError, match="non-finite"):
        encode_features(np.array([[1.0, np.inf]]))
    with pytest.raises(ValueError, match=r"\(positions, dim\)"):
        encode_features(np.zeros(4))
