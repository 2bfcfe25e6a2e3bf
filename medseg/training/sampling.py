"""Training samples as a pure function of (seed, step).

Which case a sample comes from, and the random state of every random transform that cuts and
augments its patch, follow from the seed and the sample's global index alone. So a run resumed
from a checkpoint draws exactly the patches an uninterrupted run would, whatever the number of
loader workers, and the ranks of a distributed run draw disjoint samples without coordination.
``rng_state`` and ``set_rng_state`` carry the global generators across a resume.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

__all__ = ["SeededSamples", "StepSampler", "rng_state", "set_rng_state"]


class SeededSamples(Dataset):
    """Global sample index -> a random patch of a case, reproducibly.

    Args:
        cases: a dataset of cases whose ``transform`` (a MONAI ``Compose``) ends in the random
            steps; e.g. ``medseg.data.cache.cached_dataset``.
        seed: the run's seed.

    Cases are visited in a fresh seeded order on every pass, as a shuffled loader would.
    """

    def __init__(self, cases, seed: int):
        self.cases = cases
        self.seed = seed

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int):
        n = len(self.cases)
        visit, slot = divmod(int(index), n)
        order = np.random.default_rng([self.seed, visit]).permutation(n)
        # Seed every random transform from the sample's index (MONAI's Compose hands each one a
        # seed drawn from this), so the patch does not depend on what was drawn before it.
        self.cases.transform.set_random_state(
            seed=int(np.random.default_rng([self.seed, index, 1]).integers(2**31))
        )
        return self.cases[int(order[slot])]


class StepSampler(Sampler):
    """Endless global sample indices for one rank, from step ``start`` on.

    Step ``s`` of rank ``r`` uses samples ``(s * world + r) * batch_size + j``, ``j < batch_size``.
    """

    def __init__(self, batch_size: int, start: int = 0, rank: int = 0, world: int = 1):
        self.batch_size, self.start, self.rank, self.world = batch_size, start, rank, world

    def __iter__(self) -> Iterator[int]:
        step = self.start
        while True:
            first = (step * self.world + self.rank) * self.batch_size
            yield from range(first, first + self.batch_size)
            step += 1


def rng_state() -> dict:
    """Every random generator's state, as tensors and numbers (so ``weights_only`` loads them)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "gauss": gauss,
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` saved (generators it does not name are left alone)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "numpy" in state:
        n = state["numpy"]
        keys = n["keys"].numpy().astype(np.uint32)
        np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["gauss"]))
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
