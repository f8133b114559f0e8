"""Synthetic liver tumours: a training augmentation for when few labelled tumours exist.

With three training CTs the network sees only a handful of real tumours, and a large dark
tumour it has never seen is predicted as background, which costs liver Dice (label > 0) as well
as tumour Dice. Following the idea of Hu et al., "Label-Free Liver Tumor Segmentation" (CVPR
2023), patches get hypodense masses painted into the liver: an ellipsoid with a noisy outline,
darker than the surrounding liver by a random amount, with its own texture and a soft edge, and
labelled tumour. The mass is confined to the labelled liver, so the liver's outline stays the
expert's.

Works on windowed intensities (model space, roughly 0..1 over the window) in a (1, X, Y, Z)
patch with its (1, X, Y, Z) label map; a MONAI randomizable transform so that the patch stream's
seeding makes it reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.transforms import MapTransform, RandomizableTransform
from scipy import ndimage

LIVER, TUMOUR = 1, 2


def paint_tumour(image: np.ndarray, label: np.ndarray, rng: np.random.RandomState, *,
                 min_radius: float = 3.0, max_radius: float = 18.0) -> bool:
    """Paint one tumour into (X, Y, Z) ``image``/``label`` in place; False if there is no liver.

    Radii are in voxels (3 to 18 voxels: 1.8 to 11 cm across at 3 mm, 2.4 to 14 cm at 4 mm), drawn
    log-uniformly so small and large masses are equally common.
    """
    liver = label == LIVER
    candidates = np.flatnonzero(liver)
    if candidates.size == 0:
        return False
    centre = np.array(np.unravel_index(candidates[rng.randint(candidates.size)], label.shape))
    radius = math.exp(rng.uniform(math.log(min_radius), math.log(max_radius)))
    radii = radius * rng.uniform(0.75, 1.25, size=3)
    reach = np.ceil(radii * 1.3).astype(int) + 1
    low = np.maximum(centre - reach, 0)
    high = np.minimum(centre + reach + 1, label.shape)
    box = tuple(slice(a, b) for a, b in zip(low, high, strict=True))
    grid = np.ogrid[tuple(slice(int(a - c), int(b - c)) for a, b, c in zip(low, high, centre, strict=True))]
    distance = np.sqrt(sum((g / r) ** 2 for g, r in zip(grid, radii, strict=True)))
    # A lumpy outline: coarse noise, upsampled smoothly, perturbs the ellipsoid's radius.
    shape = distance.shape
    coarse = rng.normal(0.0, 0.15, size=(4, 4, 4))
    lumps = ndimage.zoom(coarse, [s / 4 for s in shape], order=3)[: shape[0], : shape[1], : shape[2]]
    alpha = 1.0 / (1.0 + np.exp((distance + lumps - 1.0) / 0.08))  # soft edge, 0.5 on the outline
    region_liver = label[box] > 0
    alpha = np.where(region_liver, alpha, 0.0)
    if not np.any(alpha > 0.5):
        return False
    liver_level = float(np.median(image[liver]))
    # 0.1..0.4 of the window below the liver (about 40..170 HU darker for -175..250 HU).
    level = liver_level - rng.uniform(0.1, 0.4)
    texture = ndimage.gaussian_filter(rng.normal(0.0, 1.0, size=shape), sigma=1.0)
    texture *= rng.uniform(0.01, 0.05) / max(float(texture.std()), 1e-6)
    region = image[box]
    image[box] = region * (1.0 - alpha) + (level + texture) * alpha
    label[box] = np.where(alpha > 0.5, TUMOUR, label[box])
    return True


class RandSyntheticTumourd(RandomizableTransform, MapTransform):
    """With probability ``prob``, paint 1 to ``max_count`` synthetic tumours into a patch."""

    def __init__(self, keys: tuple[Hashable, Hashable] = ("image", "label"), prob: float = 0.5,
                 max_count: int = 3) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.image_key, self.label_key = keys
        self.max_count = max_count

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        out = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return out
        image = np.array(torch.as_tensor(out[self.image_key])[0], dtype=np.float32)
        label = np.array(torch.as_tensor(out[self.label_key])[0])
        count = 1 + self.R.randint(self.max_count)
        painted = [paint_tumour(image, label, self.R) for _ in range(count)]
        if any(painted):
            out[self.image_key] = torch.from_numpy(image[None])
            out[self.label_key] = torch.from_numpy(label[None].astype(np.float32))
        return out
