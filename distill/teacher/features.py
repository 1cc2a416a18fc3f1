"""Teacher features (``teacher.features``): the fixed projection that takes a layer's hidden
states (hidden size H) down to ``dim`` values per position, and the quantizer that stores each
position and layer in ``dim + 4`` bytes (``storage.codec.decode_features`` reads it back). Both
run on the engine's device, inside the device labeller (``distill.teacher.vllm_labeller``).

The projection is a random matrix with orthonormal columns, drawn from a seed: the same seed and
sizes give the same matrix on any machine, so the projection is keyed by ``(seed, H, dim)`` and
need not be stored. Orthonormal columns keep the projected features' geometry: for features spread
over many directions, a projection to ``dim`` keeps a ``dim / H`` share of their squared norm in
expectation, and no direction is stretched.
"""

from __future__ import annotations

import torch

from storage.codec import FEATURE_LEVELS


def orthogonal_projection(hidden_size: int, dim: int, seed: int = 0) -> torch.Tensor:
    """(hidden_size, dim) float32 with orthonormal columns, the same for the same arguments."""
    if not 1 <= dim <= hidden_size:
        raise ValueError(f"dim={dim} must be in [1, {hidden_size}] (the teacher's hidden size)")
    g = torch.Generator().manual_seed(int(seed))
    gaussian = torch.randn(hidden_size, dim, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)  # q: (hidden_size, dim), orthonormal columns
    q = q * torch.sign(torch.diagonal(r))  # a unique sign per column: the Haar-distributed draw
    return q.float()


def project(hidden: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """Hidden states (..., H) onto the projection's ``dim`` columns, in float32."""
    if hidden.shape[-1] != projection.shape[0]:
        raise ValueError(f"hidden states of size {hidden.shape[-1]} for a projection from {projection.shape[0]}")
    return hidden.float() @ projection.to(hidden.device)


def quantize(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., dim) float features -> float32 scales (...) and int8 codes (..., dim): each vector
    scaled by its largest magnitude / ``FEATURE_LEVELS``, every value within half a step of the
    original; an all-zero vector gets scale 0 and codes 0. Non-finite inputs give a non-finite
    scale, which the shard writer refuses."""
    x = features.float()
    scales = x.abs().amax(dim=-1) / FEATURE_LEVELS
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))[..., None]
    codes = torch.round(x / safe).clamp(-FEATURE_LEVELS, FEATURE_LEVELS).to(torch.int8)
    return scales, codes
