"""Anatomical clean-up of predicted label maps (0 background, 1 liver, 2 tumour).

A patient has one liver, without enclosed cavities, and liver tumours lie in the liver. The
network does not know that, so after the argmax:

* ``largest_component``: keep the largest 3D connected component of liver-or-tumour (label > 0,
  as in LiTS the liver includes its tumours); stray blobs (spleen, heart, noise) are dropped.
* ``fill_holes``: enclosed cavities of liver-or-tumour become liver, and enclosed cavities of a
  tumour become tumour (3D, so a vessel open to the outside stays open).
* ``tumour_inside_liver``: a tumour component that touches no liver voxel is dropped.

Everything runs on the bounding box of the foreground, so it stays fast on full-resolution CT
(512 x 512 x 150).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from liverseg.config import PostprocessConfig

LIVER = 1
TUMOUR = 2
# Face connectivity (6-neighbourhood): diagonal touching does not join two organs.
_FACES = ndimage.generate_binary_structure(3, 1)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    components, count = ndimage.label(mask, structure=_FACES)
    if count <= 1:
        return mask
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(sizes.argmax())


def _box(mask: np.ndarray, margin: int = 1) -> tuple[slice, ...]:
    """Bounding box of a non-empty mask with a margin (so boundary effects of morphology stay
    inside), from its projections on the axes: much cheaper than labelling the whole grid."""
    box = []
    for axis, size in enumerate(mask.shape):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        found = np.flatnonzero(mask.any(axis=other))
        box.append(slice(max(0, int(found[0]) - margin), min(size, int(found[-1]) + 1 + margin)))
    return tuple(box)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` plus its enclosed cavities: background components (face connectivity) that do not
    reach the array's border. Same result as ``ndimage.binary_fill_holes``, about 4x faster."""
    outside, count = ndimage.label(~mask, structure=_FACES)
    border = np.concatenate([outside[0].ravel(), outside[-1].ravel(), outside[:, 0].ravel(),
                             outside[:, -1].ravel(), outside[:, :, 0].ravel(), outside[:, :, -1].ravel()])
    reaches_border = np.zeros(count + 1, dtype=bool)
    reaches_border[border] = True
    reaches_border[0] = False  # label 0 is the mask itself
    return ~reaches_border[outside]


def _tumours_touching_liver(labels: np.ndarray) -> np.ndarray:
    """Tumour voxels whose connected tumour component shares a face with a liver voxel."""
    tumour = labels == TUMOUR
    if not tumour.any():
        return tumour
    # Inside the tumours' box (its one-voxel margin holds every face neighbour of a tumour voxel),
    # not the whole foreground: the same answer for a fraction of the dilation's cost.
    box = _box(tumour)
    sub_tumour = tumour[box]
    components, count = ndimage.label(sub_tumour, structure=_FACES)
    near_liver = ndimage.binary_dilation(labels[box] == LIVER, structure=_FACES)
    keep = np.zeros(count + 1, dtype=bool)
    keep[components[near_liver & sub_tumour]] = True  # tumour voxels only: never label 0
    out = np.zeros_like(tumour)
    out[box] = keep[components]
    return out


def postprocess_labels(labels: np.ndarray, cfg: PostprocessConfig) -> np.ndarray:
    """Clean a uint8 label map (0 background, 1 liver, 2 tumour); returns a new array."""
    out = np.array(labels, dtype=np.uint8, copy=True)
    foreground = out > 0
    if not foreground.any():
        return out
    # Everything below works inside the foreground's bounding box: nothing outside it changes.
    box = _box(foreground)
    sub = out[box]  # a view: edits below land in ``out``
    if cfg.largest_component:
        inside = sub > 0
        sub[inside & ~_largest_component(inside)] = 0
    if cfg.tumour_inside_liver:
        tumour = sub == TUMOUR
        sub[tumour & ~_tumours_touching_liver(sub)] = 0
    if cfg.fill_holes:
        filled = _fill_holes(sub > 0)
        sub[filled & (sub == 0)] = LIVER
        tumour = sub == TUMOUR
        if tumour.any():  # a tumour's cavities lie in its box (with a margin: _box)
            tumour_box = _box(tumour)
            sub[tumour_box][_fill_holes(tumour[tumour_box])] = TUMOUR
    return out
