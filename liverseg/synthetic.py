"""Synthetic liver tumours: a training augmentation for when few labelled tumours exist.

With three training CTs the network sees only a handful of real tumours, and a large dark
tumour it has never seen is predicted as background, which costs liver Dice (label > 0) as well
as tumour Dice. Following the idea of Hu et al., "Label-Free Liver Tumor Segmentation" (CVPR
2023), patches get hypodense masses painted into the liver: an ellipsoid with a noisy outline,
darker than the surrounding liver by a random amount, with its own texture and a soft edge, and
labelled tumour. A mass in the liver's interior is confined to the labelled liver, so the liver's
outline stays the expert's. A mass just inside the liver's surface may instead bulge out into the
soft tissue next to it (``bulge``), as large real tumours do: the outside part is labelled tumour
too, so the network learns that a dark mass at the liver's edge belongs to the liver (label > 0).
That lesson has a cost: a fluid-filled stomach pressed against the left lobe is also a dark mass at
the liver's edge. Decoys (``paint_decoy``) are its counterweight: dark, thin-walled pouches painted
just outside the liver, touching it but leaving the liver itself intact, and labelled background.
What separates the two is what a radiologist looks at: whether the liver's tissue is replaced.

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


def _ellipsoid(centre: np.ndarray, radius: float, shape: tuple[int, ...], rng: np.random.RandomState
               ) -> tuple[tuple[slice, ...], np.ndarray, np.ndarray]:
    """An ellipsoid with radii within 25% of ``radius`` around ``centre``: the box that holds it
    (with room for a lumpy outline), the box's low corner and the normalised distance (1 on the
    outline) over the box."""
    radii = radius * rng.uniform(0.75, 1.25, size=3)
    reach = np.ceil(radii * 1.3).astype(int) + 1
    low = np.maximum(centre - reach, 0)
    high = np.minimum(centre + reach + 1, shape)
    box = tuple(slice(a, b) for a, b in zip(low, high, strict=True))
    grid = np.ogrid[tuple(slice(int(a - c), int(b - c)) for a, b, c in zip(low, high, centre, strict=True))]
    return box, low, np.sqrt(sum((g / r) ** 2 for g, r in zip(grid, radii, strict=True)))


def _texture(shape: tuple[int, ...], rng: np.random.RandomState) -> np.ndarray:
    """Smooth zero-mean noise of random strength (0.01..0.05 of the window) for a mass's inside."""
    texture = ndimage.gaussian_filter(rng.normal(0.0, 1.0, size=shape), sigma=1.0)
    return texture * (rng.uniform(0.01, 0.05) / max(float(texture.std()), 1e-6))


def depth_inside(mask: np.ndarray) -> np.ndarray:
    """Each voxel's distance (in voxels) to the nearest voxel outside ``mask``: SciPy's exact EDT,
    run on the mask's bounding box grown by one voxel. Same values as on the whole array (that
    border is outside the mask, and any outside voxel beyond it is farther than the border), at
    about a tenth of the cost on a training patch, where the liver fills a small part."""
    boxes = ndimage.find_objects(mask.astype(np.uint8))
    depth = np.zeros(mask.shape)
    if not boxes:
        return depth
    grown = tuple(slice(max(b.start - 1, 0), min(b.stop + 1, n))
                  for b, n in zip(boxes[0], mask.shape, strict=True))
    depth[grown] = ndimage.distance_transform_edt(mask[grown])
    return depth


def paint_tumour(image: np.ndarray, label: np.ndarray, rng: np.random.RandomState, *,
                 min_radius: float = 3.0, max_radius: float = 18.0, bulge: bool = False) -> bool:
    """Paint one tumour into (X, Y, Z) ``image``/``label`` in place; False if there is no liver.

    Radii are in voxels (3 to 18 voxels: 1.8 to 11 cm across at 3 mm, 2.4 to 14 cm at 4 mm), drawn
    log-uniformly so small and large masses are equally common. With ``bulge`` the mass is centred
    just inside the liver's surface and also covers the adjacent soft tissue (not air, fat or bone)
    within its connected piece, so it reads as one mass growing out of the liver.
    """
    liver = label == LIVER
    if not liver.any():
        return False
    radius = math.exp(rng.uniform(math.log(min_radius), math.log(max_radius)))
    candidates = np.flatnonzero(liver)
    if bulge:
        # Centred 0.3 to 0.6 radii inside the surface: a cap of the mass (less than half of it)
        # sticks out, as in a tumour that deforms the liver's outline rather than sits beside it.
        depth = depth_inside(label > 0)
        near_surface = np.flatnonzero(liver & (depth >= 0.3 * radius) & (depth <= 0.6 * radius))
        if near_surface.size:
            candidates = near_surface
    centre = np.array(np.unravel_index(candidates[rng.randint(candidates.size)], label.shape))
    box, low, distance = _ellipsoid(centre, radius, label.shape, rng)
    # A lumpy outline: coarse noise, upsampled smoothly, perturbs the ellipsoid's radius.
    shape = distance.shape
    coarse = rng.normal(0.0, 0.15, size=(4, 4, 4))
    lumps = ndimage.zoom(coarse, [s / 4 for s in shape], order=3)[: shape[0], : shape[1], : shape[2]]
    alpha = 1.0 / (1.0 + np.exp((distance + lumps - 1.0) / 0.08))  # soft edge, 0.5 on the outline
    liver_level = float(np.median(image[liver]))
    region = image[box]
    allowed = label[box] > 0
    if bulge:
        # Soft tissue: from about 130 HU below the liver to 60 HU above it (window -175..250 HU),
        # relative to the liver's own level so that it holds for any window; keeps air, fat and
        # bone unpainted.
        soft = (region > liver_level - 0.3) & (region < liver_level + 0.15)
        pieces, _ = ndimage.label((alpha > 0.5) & (allowed | soft))
        centre_piece = pieces[tuple(centre - low)]
        allowed = allowed | ((pieces == centre_piece) & (centre_piece > 0))
    alpha = np.where(allowed, alpha, 0.0)
    if not np.any(alpha > 0.5):
        return False
    # 0.1..0.4 of the window below the liver (about 40..170 HU darker for -175..250 HU).
    level = liver_level - rng.uniform(0.1, 0.4)
    texture = _texture(shape, rng)
    image[box] = region * (1.0 - alpha) + (level + texture) * alpha
    label[box] = np.where(alpha > 0.5, TUMOUR, label[box])
    return True


def paint_decoy(image: np.ndarray, label: np.ndarray, rng: np.random.RandomState, *,
                min_radius: float = 4.0, max_radius: float = 14.0) -> bool:
    """Paint one dark, thin-walled pouch just outside the liver into (X, Y, Z) ``image`` in place,
    leaving ``label`` background there; False if there is no liver or no room beside it.

    Radii are in voxels (4 to 14: 3 to 11 cm across at 4 mm), log-uniform. The pouch is centred
    outside the liver at 0.5 to 0.9 radii from it, so it touches or nearly touches the liver, and
    covers only body tissue that is not liver or tumour (not air, not bone). Its content is as dark
    as a synthetic tumour (0.1..0.4 of the window below the liver) and its one-voxel wall is about
    as bright as the liver, like a stomach's enhancing wall.
    """
    liver = label == LIVER
    if not liver.any():
        return False
    radius = math.exp(rng.uniform(math.log(min_radius), math.log(max_radius)))
    liver_level = float(np.median(image[liver]))
    organ = label > 0
    # Body tissue beside the liver: fat up to well-enhanced soft tissue, no air or lung, no bone.
    tissue = ~organ & (image > liver_level - 0.5) & (image < liver_level + 0.25)
    gap = ndimage.distance_transform_edt(~organ)
    candidates = np.flatnonzero(tissue & (gap >= 0.5 * radius) & (gap <= 0.9 * radius))
    if not candidates.size:
        return False
    centre = np.array(np.unravel_index(candidates[rng.randint(candidates.size)], label.shape))
    box, low, distance = _ellipsoid(centre, radius, label.shape, rng)
    ellipsoid = distance < 1.0
    # The connected piece of allowed tissue around the centre: the pouch does not jump over air.
    pieces, _ = ndimage.label(ellipsoid & tissue[box])
    centre_piece = pieces[tuple(centre - low)]
    if centre_piece == 0:
        return False
    pouch = pieces == centre_piece
    wall = pouch & ~ndimage.binary_erosion(pouch)
    region = image[box]
    content = liver_level - rng.uniform(0.1, 0.4)
    texture = _texture(pouch.shape, rng)
    wall_level = liver_level + rng.uniform(-0.1, 0.05)
    painted = np.where(wall, wall_level, content + texture)
    image[box] = np.where(pouch, painted, region)
    return True


def _patch_arrays(data: Mapping[Hashable, torch.Tensor], image_key: Hashable, label_key: Hashable
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Writable copies of a (1, X, Y, Z) patch's image (float32) and label as (X, Y, Z) arrays, so
    painting never changes the cached case the patch came from."""
    image = torch.as_tensor(data[image_key])[0].numpy().astype(np.float32)
    return image, torch.as_tensor(data[label_key])[0].numpy().copy()


class RandSyntheticTumourd(RandomizableTransform, MapTransform):
    """With probability ``prob``, paint 1 to ``max_count`` synthetic tumours into a patch; each one
    bulges out of the liver's surface with probability ``bulge_prob``."""

    def __init__(self, keys: tuple[Hashable, Hashable] = ("image", "label"), prob: float = 0.5,
                 max_count: int = 3, bulge_prob: float = 0.0) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.image_key, self.label_key = keys
        self.max_count = max_count
        self.bulge_prob = bulge_prob

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        out = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return out
        image, label = _patch_arrays(out, self.image_key, self.label_key)
        count = 1 + self.R.randint(self.max_count)
        painted = [paint_tumour(image, label, self.R, bulge=self.R.uniform() < self.bulge_prob)
                   for _ in range(count)]
        if any(painted):
            out[self.image_key] = torch.from_numpy(image[None])
            out[self.label_key] = torch.from_numpy(label[None].astype(np.float32))
        return out


class RandSyntheticDecoyd(RandomizableTransform, MapTransform):
    """With probability ``prob``, paint one dark pouch labelled background just outside the liver
    (``paint_decoy``); the label map is left as it is."""

    def __init__(self, keys: tuple[Hashable, Hashable] = ("image", "label"), prob: float = 0.5) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.image_key, self.label_key = keys

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        out = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return out
        image, label = _patch_arrays(out, self.image_key, self.label_key)
        if paint_decoy(image, label, self.R):
            out[self.image_key] = torch.from_numpy(image[None])
        return out
