"""Per-sample seeds: every random draw of a run (permutation, augmentation, mask noise, loader) derives from
integers that name it, never from a process's RNG state, so 1 or N processes and any resume draw the same."""

from __future__ import annotations

__all__ = ["derive_seed", "sample_seed"]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*words: int) -> int:
    """Well-mixed 63-bit seed from integers (torch's CPU generator only uses the low 32 bits of a seed, so
    ``(epoch << 32) + index`` would collide; hashing first does not)."""
    h = 0
    for w in words:
        h = _splitmix64(h ^ (int(w) & _MASK64))
    return h >> 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of dataset item ``index`` in ``epoch``: augmentation and masking noise both derive from it."""
    return derive_seed(seed, epoch, index)
