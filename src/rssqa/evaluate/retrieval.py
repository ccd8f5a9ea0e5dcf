"""Image-text retrieval recall (R@K both ways, mean recall), as reported for RSICD / RSITMD style benchmarks.

Pair ``i`` is image ``i`` with caption ``i``. A query's rank is the number of candidates scoring at
least as high as its true match, other than the match itself: ties count against the model, so a
collapsed embedding scores zero instead of looking perfect.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def match_ranks(similarity: torch.Tensor) -> torch.Tensor:
    """Rank (0 = first) of the true match of each query, ties counted pessimistically.

    Args:
        similarity: ``N×N`` scores, queries along rows, the true match on the diagonal.

    Returns:
        ``N`` int64 ranks in ``[0, N-1]``.
    """
    if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"similarity must be square N×N, got shape {tuple(similarity.shape)}")
    true = similarity.diagonal().unsqueeze(1)
    return (similarity >= true).sum(dim=1) - 1


def retrieval_recall(
    image_features: torch.Tensor, text_features: torch.Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall at K for image-to-text and text-to-image retrieval, and their mean.

    Args:
        image_features: ``N×D`` L2-normalised image embeddings.
        text_features: ``N×D`` L2-normalised caption embeddings, row ``i`` describing image ``i``.
        ks: cut-offs.

    Returns:
        ``{"i2t_R@1": r, ..., "t2i_R@10": r, "mean_recall": r}``, each in [0, 1]; ``mean_recall`` is the
        mean over both directions and all ``ks``.
    """
    if image_features.shape != text_features.shape or image_features.ndim != 2 or len(image_features) == 0:
        raise ValueError(
            f"need N×D image and text features of one shape, got {tuple(image_features.shape)} "
            f"and {tuple(text_features.shape)}"
        )
    sim = image_features.float() @ text_features.float().T
    out: dict[str, float] = {}
    for direction, ranks in (("i2t", match_ranks(sim)), ("t2i", match_ranks(sim.T))):
        for k in ks:
            out[f"{direction}_R@{k}"] = float((ranks < k).float().mean())
    out["mean_recall"] = sum(out.values()) / len(out)
    return out
