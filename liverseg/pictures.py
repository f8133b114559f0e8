"""Overlay pictures: CT in an abdominal window with mask outlines, three orthogonal slices.

Used by ``liverseg infer --preview`` and by the scoring report (worst cases). Rendering uses a
bare :class:`matplotlib.figure.Figure` with the Agg canvas, never pyplot, so it is thread-safe and
never needs a display.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from liverseg.io import atomic_path

#: Abdominal soft-tissue window in HU (level 37.5, width 425).
WINDOW_HU = (-175.0, 250.0)
#: Outline colours, one per mask in the order given (colour-blind friendly first picks).
COLOURS = ("#00e5ff", "#ff3b30", "#ffd60a", "#34c759", "#bf5af2", "#ff9f0a")
_LABEL_NAMES = {1: "liver", 2: "tumour"}
# Display (radiological) order: i -> patient Left, j -> Posterior, k -> Superior.
_DISPLAY_AXCODES = ("L", "P", "S")


def save_overlay_png(
    image_hu: np.ndarray,
    masks: np.ndarray | dict[str, np.ndarray],
    spacing: tuple[float, float, float],
    path: str | Path,
    title: str = "",
    affine: np.ndarray | None = None,
) -> Path:
    """Write a PNG of axial, coronal and sagittal slices with each mask outlined; return its path.

    Orientation assumption: arrays are in NIfTI voxel order (x, y, z). Without ``affine`` they
    are taken to be LPS-like, i.e. index i runs towards the patient's Left, j towards Posterior
    and k towards Superior (the DICOM/ITK order, and that of the IRCADb data). Pass the volume's
    ``affine`` (RAS+ mm, as in :class:`liverseg.io.Volume`) and the arrays are first reoriented
    to that order with nibabel, so any input orientation displays correctly. Display is
    radiological: axial seen from the feet (patient right on the image left, anterior up),
    coronal seen from the front (patient right on the image left, superior up), sagittal seen
    from the patient's left (anterior on the image left, superior up). Pixels are drawn in mm,
    so the aspect ratio follows ``spacing``.

    The slices pass through the centre of mass of the first mask's foreground (the volume
    centre when it is empty). ``masks`` is a dict name -> boolean/label array, or one label
    map whose non-zero labels are outlined separately (1 liver, 2 tumour; others by value).
    The file is written atomically (no partial PNG on failure).
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from scipy import ndimage

    image = np.asarray(image_hu)
    if image.ndim != 3:
        raise ValueError(f"image must be 3D, got shape {image.shape}")
    named = _named_masks(masks)
    for name, mask in named.items():
        if mask.shape != image.shape:
            raise ValueError(f"mask {name!r} shape {mask.shape} differs from image {image.shape}")
    sp = tuple(float(s) for s in spacing)
    if affine is not None:
        image, named, sp = _to_display_order(image, named, sp, np.asarray(affine, dtype=float))

    first = next(iter(named.values()), None)
    if first is not None and first.any():
        centre = [round(float(c)) for c in ndimage.center_of_mass(first)]
    else:
        centre = [s // 2 for s in image.shape]
    ci, cj, ck = (min(max(c, 0), n - 1) for c, n in zip(centre, image.shape, strict=True))
    nx, ny, nz = image.shape
    sx, sy, sz = sp

    # (2D CT, 2D masks, extent in mm, origin, x coords, y coords, corner letters (left, right))
    views = [
        ("axial", image[:, :, ck].T, [m[:, :, ck].T for m in named.values()],
         (0, nx * sx, ny * sy, 0), "upper", (np.arange(nx) + 0.5) * sx, (np.arange(ny) + 0.5) * sy,
         ("R", "L"), f"z={ck}"),
        ("coronal", image[:, cj, :].T, [m[:, cj, :].T for m in named.values()],
         (0, nx * sx, 0, nz * sz), "lower", (np.arange(nx) + 0.5) * sx, (np.arange(nz) + 0.5) * sz,
         ("R", "L"), f"y={cj}"),
        ("sagittal", image[ci, :, :].T, [m[ci, :, :].T for m in named.values()],
         (0, ny * sy, 0, nz * sz), "lower", (np.arange(ny) + 0.5) * sy, (np.arange(nz) + 0.5) * sz,
         ("A", "P"), f"x={ci}"),
    ]
    widths = [v[3][1] - v[3][0] for v in views]
    fig = Figure(figsize=(12, 4.6), dpi=100, facecolor="black")
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": widths})
    lo, hi = WINDOW_HU
    for ax, (name, ct2d, masks2d, extent, origin, xs, ys, letters, where) in zip(axes, views,
                                                                               strict=True):
        ax.imshow(ct2d, cmap="gray", vmin=lo, vmax=hi, extent=extent, origin=origin,
                  interpolation="bilinear", aspect="equal")
        for colour, m2d in zip(COLOURS * 4, masks2d, strict=False):
            if m2d.any() and not m2d.all():
                ax.contour(xs, ys, m2d.astype(np.float32), levels=[0.5], colors=[colour],
                           linewidths=1.2)
        ax.set_title(f"{name} ({where})", color="white", fontsize=10)
        ax.text(0.02, 0.5, letters[0], color="yellow", transform=ax.transAxes, va="center")
        ax.text(0.98, 0.5, letters[1], color="yellow", transform=ax.transAxes, va="center",
                ha="right")
        ax.set_axis_off()
    handles = [Line2D([], [], color=c, lw=2, label=n)
               for c, n in zip(COLOURS * 4, named, strict=False)]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False,
                   labelcolor="white", fontsize=10)
    if title:
        fig.suptitle(title, color="white", fontsize=12)
    fig.tight_layout(rect=(0, 0.06 if handles else 0, 1, 0.94 if title else 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", facecolor=fig.get_facecolor())
    return Path(path)


def _named_masks(masks: np.ndarray | dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if isinstance(masks, dict):
        return {str(k): np.asarray(v) > 0 for k, v in masks.items()}
    labels = np.asarray(masks)
    values = [int(v) for v in np.unique(labels) if v != 0]
    if not values:
        return {"mask": np.zeros(labels.shape, dtype=bool)}
    if values == [1] or labels.dtype == bool:
        return {"mask": labels > 0}
    return {_LABEL_NAMES.get(v, f"label {v}"): labels == v for v in values}


def _to_display_order(
    image: np.ndarray, masks: dict[str, np.ndarray], spacing: tuple[float, ...], affine: np.ndarray
) -> tuple[np.ndarray, dict[str, np.ndarray], tuple[float, float, float]]:
    """Reorient arrays (and spacing) from the affine's voxel order to LPS display order."""
    import nibabel as nib

    current = nib.orientations.io_orientation(affine)
    transform = nib.orientations.ornt_transform(
        current, nib.orientations.axcodes2ornt(_DISPLAY_AXCODES))
    new_spacing = [0.0, 0.0, 0.0]
    for axis, (target, _flip) in enumerate(transform):
        new_spacing[int(target)] = spacing[axis]
    image = nib.orientations.apply_orientation(image, transform)
    masks = {k: nib.orientations.apply_orientation(m, transform) for k, m in masks.items()}
    return image, masks, (new_spacing[0], new_spacing[1], new_spacing[2])
