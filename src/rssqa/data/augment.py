"""Remote-sensing augmentation: the eight symmetries of the square (90-degree rotations and flips).

Overhead imagery has no "up": a scene rotated by 90 degrees or mirrored is still the same scene with
the same caption, so these are label-preserving and, unlike random crops or colour jitter, change
neither the content a caption names nor the sensor conditions the quality model must see.

The choice of transform is a pure function of ``(seed, epoch, key)``: the same sample gets the same
transform whichever DataLoader worker or DDP rank reads it, and a resumed run repeats it exactly.
"""

from __future__ import annotations

import hashlib

import numpy as np

N_DIHEDRAL = 8


def dihedral(image: np.ndarray, k: int) -> np.ndarray:
    """Apply symmetry ``k`` of the square to an ``H×W×C`` (or ``H×W``) image.

    Args:
        image: pixels with the spatial axes first.
        k: in ``0..7``: ``k % 4`` counter-clockwise quarter turns, then a left-right mirror when ``k >= 4``.
            ``k = 0`` is the identity.

    Returns:
        A contiguous array (``H`` and ``W`` swap for odd quarter turns).
    """
    if not 0 <= k < N_DIHEDRAL:
        raise ValueError(f"dihedral index must be in 0..7, got {k}")
    out = np.rot90(image, k % 4, axes=(0, 1))
    if k >= 4:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def dihedral_index(seed: int, epoch: int, key: str) -> int:
    """The symmetry (``0..7``) drawn for sample ``key`` in ``epoch``: uniform, reproducible, process-independent."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % N_DIHEDRAL


class RandomDihedral:
    """Training augmentation: each sample gets one of the eight symmetries, drawn from its key.

    Args:
        seed: run seed.
        enabled: False makes this the identity (evaluation, ablations).

    Call with ``(image, key)``; set :attr:`epoch` to draw fresh symmetries each epoch.
    """

    def __init__(self, seed: int = 0, enabled: bool = True):
        self.seed, self.enabled, self.epoch = seed, enabled, 0

    def __call__(self, image: np.ndarray, key: str) -> np.ndarray:
        if not self.enabled:
            return image
        return dihedral(image, dihedral_index(self.seed, self.epoch, key))
