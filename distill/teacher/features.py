"""Teacher features (issue 27, in progress): the fixed projection that takes a layer's hidden
states (hidden size H) down to ``dim`` values per position before they are quantized and stored
(``storage.codec.encode_features``).

The projection is a random matrix with orthonormal columns, drawn from a seed: the same seed and
sizes give the same matrix on any machine, so the projection is keyed by ``(seed, H, dim)`` and
need not be stored. Orthonormal columns keep the projected features' geometry: for features spread
over many directions, a projection to ``dim`` keeps a ``dim / H`` share of their squared norm in
expectation, and no direction is stretched. Not wired into the engine or the trainer yet.
"""

from __future__ import annotations

import torch


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
