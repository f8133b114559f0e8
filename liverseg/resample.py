"""Moving arrays between voxel grids: the primitives behind :mod:`liverseg.modelspace`.

Two kinds of grid change occur:

* the same box sampled more coarsely or finely along each axis (model spacing <-> native spacing):
  :func:`resize`, separable, with the two grids' extents identical (voxel-corner alignment,
  ``align_corners=False``); downsampling averages (area), which anti-aliases, upsampling is linear.
  :func:`axis_operator` writes one axis of it as a matrix, so that any block of the output can
  be computed alone, exactly as :func:`resize` would give it (:func:`resize_block`): the native
  grid is then filled slab by slab, and only where the answer can change.
* a grid rotated against the other (an oblique scan against the world-aligned model grid):
  :func:`world_sample`, trilinear sampling at the same world positions, one block at a time.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # [start, stop) per axis


def resize(array: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Resize a (C, X, Y, Z) float tensor to ``shape`` with aligned grid extents.

    Axes that shrink are area-averaged first (anti-aliasing), axes that grow are then
    interpolated trilinearly; both use the same voxel-corner alignment.
    """
    src = tuple(array.shape[1:])
    shape = tuple(int(s) for s in shape)
    if src == shape:
        return array
    x = array.unsqueeze(0)
    shrunk = tuple(min(s, t) for s, t in zip(src, shape, strict=True))
    if shrunk != src:
        x = F.adaptive_avg_pool3d(x, shrunk)
    if shrunk != shape:
        x = F.interpolate(x, size=shape, mode="trilinear", align_corners=False)
    return x[0]


def resize_native(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Resize a 3D float32 array to ``shape`` (as :func:`resize`), whatever its memory order.

    nibabel gives Fortran-ordered arrays; their transpose is a C-ordered view, and resizing that
    view (with the shape reversed) avoids a full-size copy and is about 3x faster.
    """
    if array.flags.f_contiguous and not array.flags.c_contiguous:
        out = resize(torch.from_numpy(array.T)[None], tuple(reversed(shape)))[0]
        return out.numpy().T
    return resize(torch.from_numpy(np.ascontiguousarray(array))[None], tuple(shape))[0].numpy()


def axis_operator(size_in: int, size_out: int) -> torch.Tensor:
    """(size_out, size_in) weights of :func:`resize` along one axis.

    Made by running torch's own pooling or interpolation on the identity, so the weights are
    those :func:`resize` uses (trilinear interpolation and 3D area averaging are separable).
    Each row is a convex combination of a few neighbouring input voxels.
    """
    eye = torch.eye(size_in)[None]  # channel j holds the unit impulse at j
    if size_out < size_in:
        columns = F.adaptive_avg_pool1d(eye, size_out)
    elif size_out > size_in:
        columns = F.interpolate(eye, size=size_out, mode="linear", align_corners=False)
    else:
        return eye[0]
    return columns[0].T.contiguous()


def rows_touching(operator: torch.Tensor, start: int, stop: int) -> tuple[int, int]:
    """The output range [first, last) whose weights reach input voxels [start, stop)."""
    rows = torch.nonzero(operator[:, start:stop].sum(1)).flatten()
    return (int(rows[0]), int(rows[-1]) + 1) if len(rows) else (0, 0)


_CONTRACT = ("kx,cxyz->ckyz", "ky,cxyz->cxkz", "kz,cxyz->cxyk")


def resize_block(grid: torch.Tensor, operators: list[torch.Tensor], box: Box) -> torch.Tensor:
    """The block ``box`` (output voxel ranges) of ``resize(grid, output shape)``, alone.

    ``grid`` is (C, X, Y, Z); ``operators[a]`` is :func:`axis_operator` for axis ``a``. Each axis
    takes only the rows of the block and the input voxels they weigh, so cost and memory follow
    the block. The weights are applied as small dense matrix products, which BLAS does faster
    than gathering the two or three neighbours each output voxel needs.
    """
    out = grid
    for axis in (2, 1, 0):  # the last axis first: callers ask for slabs along it
        start, stop = box[axis]
        rows = operators[axis][start:stop]
        used = torch.nonzero(rows.sum(0)).flatten()
        first, last = int(used[0]), int(used[-1]) + 1
        out = torch.einsum(_CONTRACT[axis], rows[:, first:last],
                           out.narrow(axis + 1, first, last - first))
    return out


def world_sample(source: torch.Tensor, source_affine: np.ndarray, target_affine: np.ndarray,
                 box: Box, fill: list[float]) -> torch.Tensor:
    """(C, source grid) sampled trilinearly at the world positions of the target voxels in ``box``
    (index ranges of the target grid) -> (C, box shape); ``fill[c]`` outside the source."""
    index_map = torch.as_tensor(np.linalg.inv(source_affine) @ target_affine, dtype=torch.float32)
    offset = torch.tensor(fill, dtype=torch.float32).view(-1, 1, 1, 1)
    src = (source.float() - offset)[None]  # zero padding outside == fill after adding it back
    sizes = torch.tensor(source.shape[1:], dtype=torch.float32)
    scale = 2.0 / torch.clamp(sizes - 1.0, min=1.0)
    axes = [torch.arange(start, stop, dtype=torch.float32) for start, stop in box]
    ijk = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    coords = ijk @ index_map[:3, :3].T + index_map[:3, 3]  # source voxel indices
    grid = (coords * scale - 1.0).flip(-1)[None]  # grid_sample wants (z, y, x) = (W, H, D)
    sampled = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return sampled[0].add_(offset)


def world_resample(source: torch.Tensor, source_affine: np.ndarray, target_affine: np.ndarray,
                   target_shape: tuple[int, ...], fill: list[float], chunk: int = 8) -> torch.Tensor:
    """(C, source grid) -> (C, target grid) by :func:`world_sample` in slabs of ``chunk`` slices."""
    out = torch.empty((source.shape[0], *target_shape), dtype=torch.float32)
    nx, ny, nz = target_shape
    for k0 in range(0, nz, chunk):
        k1 = min(nz, k0 + chunk)
        out[..., k0:k1] = world_sample(source, source_affine, target_affine,
                                       ((0, nx), (0, ny), (k0, k1)), fill)
    return out


def box_in_target(source_box: Box, source_affine: np.ndarray, target_affine: np.ndarray,
                  target_shape: tuple[int, ...]) -> Box:
    """Target voxel ranges covering every target voxel whose trilinear sample reaches a source
    voxel inside ``source_box`` (the box grown by one voxel, mapped by its corners, clipped)."""
    index_map = np.linalg.inv(target_affine) @ source_affine
    corners = np.array([[a, b, c, 1.0] for a in (source_box[0][0] - 1, source_box[0][1])
                        for b in (source_box[1][0] - 1, source_box[1][1])
                        for c in (source_box[2][0] - 1, source_box[2][1])])
    target = (index_map @ corners.T)[:3]
    low = np.floor(target.min(axis=1)).astype(int)
    high = np.ceil(target.max(axis=1)).astype(int) + 1
    return tuple((int(max(0, lo)), int(min(n, hi))) for lo, hi, n  # type: ignore[return-value]
                 in zip(low, high, target_shape, strict=True))
