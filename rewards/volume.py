"""The GARD volume of k unit-norm embeddings (GARD eq. 12-13)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gram_volume(embeddings: torch.Tensor) -> torch.Tensor:
    """Volume of the parallelotope spanned by k unit-normalized vectors: [B, k, n] -> [B].

    GARD eq. 12-13: with v_1..v_k L2-normalized, ``G = V Vᵀ`` ([B, k, k], ``G_ij = <v_i, v_j>``) and
    ``Vol = sqrt(det G)``. For k = 2, ``det G = 1 - cos²``, so ``Vol = sqrt(1 - cos²(v_1, v_2))``: 0 when
    the modalities are aligned (parallel), 1 when orthogonal. Any k >= 2 works (e.g. text, image and a
    caption's text embedding). The result is scale invariant in each v_i and lies in [0, 1].

    ``det G`` can come out slightly negative for (nearly) dependent vectors from rounding; it is
    clamped at 0. Differentiable (float32 or float64); where ``det G <= 0`` the gradient is set to 0
    instead of sqrt's infinite slope, so degenerate items cannot put NaN into a backward pass.
    """
    if embeddings.ndim != 3 or embeddings.shape[1] < 2:
        raise ValueError(
            f"gram_volume expects embeddings of shape [B, k, n] with k >= 2 modalities, "
            f"got {tuple(embeddings.shape)}"
        )
    v = F.normalize(embeddings, dim=-1)  # [B, k, n]
    gram = v @ v.transpose(-1, -2)  # [B, k, k]
    det = torch.linalg.det(gram)  # [B]
    positive = det > 0
    safe = torch.where(positive, det, torch.ones_like(det))
    return torch.where(positive, safe.sqrt(), torch.zeros_like(det))
