"""Post-processing of label maps: keep the largest connected piece of a label.

A heart has one left ventricle: a second blob of "LV" elsewhere is a false positive, and keeping
the largest piece removes it. Pieces touching along an edge or a corner count as one piece
(full connectivity), so a thin wall cut diagonally by the grid is not broken up.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from medseg.errors import ConfigError

__all__ = ["keep_largest_labels", "keep_largest_component"]


def keep_largest_labels(setting: list[int] | str, labels: dict[int, str]) -> list[int]:
    """The label indices ``infer.keep_largest`` names: ``all`` foreground labels, ``none``, or
    a list of indices (each must be a foreground label of the model)."""
    foreground = sorted(k for k in labels if k != 0)
    if setting == "all":
        return foreground
    if setting == "none":
        return []
    if isinstance(setting, str) or any(k not in foreground for k in setting):
        raise ConfigError(
            "infer.keep_largest",
            f"{setting!r} must be 'all', 'none' or a list of foreground labels among {foreground}",
        )
    return sorted(set(setting))


def keep_largest_component(labels: np.ndarray, classes: list[int]) -> np.ndarray:
    """Set every piece of each of ``classes`` but its largest to background, in place.

    Only the bounding box of each class is searched, so small structures in a large volume
    cost little.

    Returns:
        ``labels``, changed in place.
    """
    boxes = ndimage.find_objects(labels)
    structure = np.ones((3,) * labels.ndim, dtype=bool)
    for c in classes:
        if c > len(boxes) or boxes[c - 1] is None:
            continue  # the class is absent
        box = labels[boxes[c - 1]]
        pieces, count = ndimage.label(box == c, structure=structure)
        if count < 2:
            continue
        sizes = np.bincount(pieces.ravel())
        sizes[0] = 0
        box[(pieces != 0) & (pieces != sizes.argmax())] = 0
    return labels
