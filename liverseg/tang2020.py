"""The liver U-Net of Tang et al. 2020, in PyTorch, with a memory-lean forward pass for inference.

Tang X, Jafargholi Rangraz E, Coudyzer W, et al. "Whole liver segmentation based on deep learning and
manual adjustment for clinical use in SIRT." EJNMMI Research 10, 2020. The architecture is that of
``create_unet_like_model`` (pyliverlesionseg 0.3, ``architectures/unet_generalized.py``, Apache-2.0)
as its liver model calls it; this is our own code, written from that description.
``pipelines/import_tang2020.py`` converts the published Keras weights.

Four resolutions (max-pool 3: x1, x3, x9, x27); 'same' convolutions with (3, 3, 1) and (3, 3, 3)
kernels (the 1 across slices); parameter-free instance normalisation ``(x - mean) / (std + 1e-7)``
(population std over the whole input, per channel) before every convolution but the first;
LeakyReLU(0.01); "linear" upsampling (nearest x3 then a 3-wide average, n -> 3n - 2); skips cropped
centrally and concatenated skip-first; a final 1x1x1 convolution. Input sides must be multiples of 27;
the output is :data:`MARGIN` voxels smaller per side.

Memory. The statistics of every normalisation cover the whole input, which is why the network is run
on large windows (see the bundle's plan). At full resolution a 189 x 162 x 162 window holds 5 M voxels,
so each 40-channel map takes 0.8 GB. In inference the full-resolution layers are therefore computed in
slabs of slices: a first pass gathers a layer's statistics, a second applies normalisation and the
next convolution slab by slab, with a one-slice halo where the kernel spans slices. The result is the
same computation (up to floating-point summation order) with a peak of about one full-resolution
40-channel map (at output size) instead of five at input size.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

MARGIN = 13
_EPSILON = 1e-7  # Keras' K.epsilon(), added to the standard deviation (not the variance)
_SLAB = 12  # full-resolution slices per slab in the lean forward pass
_FLAT, _FULL = (3, 3, 1), (3, 3, 3)


def _conv(cin: int, cout: int, kernel: tuple[int, int, int]) -> nn.Conv3d:
    return nn.Conv3d(cin, cout, kernel, padding=tuple(k // 2 for k in kernel))


def _normalise_activate(x: torch.Tensor) -> torch.Tensor:
    """Instance normalisation over the whole patch, then LeakyReLU(0.01); in place without autograd."""
    var, mean = torch.var_mean(x, dim=(2, 3, 4), correction=0, keepdim=True)
    if torch.is_grad_enabled() and x.requires_grad:
        return F.leaky_relu((x - mean) / (var.sqrt() + _EPSILON), 0.01)
    return _apply_norm_(x, mean, var.sqrt_().add_(_EPSILON))


def _apply_norm_(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu_(x.sub_(mean).div_(std), 0.01)


class _Statistics:
    """Per-channel mean and (population std + epsilon) of a map seen in pieces.

    Each piece gives its own mean and variance (float32, as a whole-map ``var_mean`` would); they
    are pooled exactly in float64 (the parallel-variance formula), so no piece is ever copied.
    """

    def __init__(self) -> None:
        self.parts: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def add(self, x: torch.Tensor) -> None:
        var, mean = torch.var_mean(x, dim=(0, 2, 3, 4), correction=0)
        self.parts.append((x[0, 0].numel() * x.shape[0], mean.double(), var.double()))

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        total = sum(n for n, _, _ in self.parts)
        mean = sum(n * m for n, m, _ in self.parts) / total
        var = sum(n * (v + (m - mean).square()) for n, m, v in self.parts) / total
        std = var.clamp(min=0.0).sqrt() + _EPSILON
        shape = (1, -1, 1, 1, 1)
        return mean.float().view(shape), std.float().view(shape)


def _slabs(depth: int, size: int = _SLAB) -> Iterator[tuple[int, int]]:
    for start in range(0, depth, size):
        yield start, min(depth, start + size)


def _upsample3(x: torch.Tensor) -> torch.Tensor:
    """Nearest x3 then a 3-wide average (stride 1, valid): n -> 3n - 2. That is exactly trilinear
    interpolation at positions j / 3 of the coarse grid (align_corners=True)."""
    size = tuple(3 * n - 2 for n in x.shape[2:])
    return F.interpolate(x, size=size, mode="trilinear", align_corners=True)


def _upsample3_slices(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Slices ``start:stop`` (fine grid) of ``_upsample3(x)``, from the coarse slices they need."""
    first, last = start // 3, (stop + 1) // 3  # coarse slices holding fine slices start .. stop-1
    block = x[..., first : last + 1]
    size = (3 * x.shape[2] - 2, 3 * x.shape[3] - 2, 3 * (last - first) + 1)
    fine = F.interpolate(block, size=size, mode="trilinear", align_corners=True)
    return fine[..., start - 3 * first : stop - 3 * first]


def _centre_crop(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    starts = [(n - m) // 2 for n, m in zip(x.shape[2:], shape, strict=True)]
    return x[
        :,
        :,
        starts[0] : starts[0] + shape[0],
        starts[1] : starts[1] + shape[1],
        starts[2] : starts[2] + shape[2],
    ]


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """oneDNN's fast layout for 3D convolutions on the CPU: 1.5-2.3x faster here with 20-40 channels."""
    return x.contiguous(memory_format=torch.channels_last_3d)


def _empty_channels_last(like: torch.Tensor, channels: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.empty(
        (1, channels, *shape), dtype=like.dtype, device=like.device, memory_format=torch.channels_last_3d
    )


def _pad_slices(x: torch.Tensor, start: int, stop: int, depth: int) -> torch.Tensor:
    """The 'same' zero padding across slices, where a slab touches the ends of the volume."""
    before, after = int(start == 0), int(stop == depth)
    return F.pad(x, (before, after)) if before or after else x


class _SplitConv(nn.Module):
    """A convolution over the concatenation [skip, up] computed as two convolutions summed.

    Normalisation and activation act per channel, so normalising the two parts apart and summing
    their convolutions equals the original's normalise(concat) -> conv, without a concatenated copy.
    The weight is stored whole (as in the original) so the state dict maps one to one.
    """

    def __init__(
        self, skip_channels: int, up_channels: int, out_channels: int, kernel: tuple[int, int, int]
    ) -> None:
        super().__init__()
        self.skip_channels = skip_channels
        self.conv = nn.Conv3d(
            skip_channels + up_channels, out_channels, kernel, padding=tuple(k // 2 for k in kernel)
        )

    def forward(
        self, skip: torch.Tensor, up: torch.Tensor, padding: tuple[int, ...] | None = None
    ) -> torch.Tensor:
        """Both parts already normalised and activated."""
        w, c = self.conv.weight, self.skip_channels
        pad = self.conv.padding if padding is None else padding
        out = F.conv3d(up, w[:, c:], self.conv.bias, padding=pad)
        return out.add_(F.conv3d(skip, w[:, :c], None, padding=pad))


class Tang2020UNet(nn.Module):
    """The liver U-Net of Tang et al. 2020 (3,874,961 parameters; see the module docstring).

    The original ends in a sigmoid (P(liver)). With ``out_channels=2`` the head keeps its single
    channel ``z`` and returns the logits ``[0, z]``, whose softmax is exactly ``[1 - sigmoid(z),
    sigmoid(z)]``, so liverseg's softmax-based inference applies unchanged. With more channels the
    head is a plain ``out_channels`` convolution (for fine-tuning with a tumour class).
    """

    def __init__(self, out_channels: int = 2) -> None:
        super().__init__()
        self.conv1, self.conv2 = _conv(1, 20, _FLAT), _conv(20, 40, _FULL)
        self.conv3, self.conv4 = _conv(40, 40, _FLAT), _conv(40, 80, _FULL)
        self.conv5, self.conv6 = _conv(80, 80, _FLAT), _conv(80, 160, _FULL)
        self.conv7, self.conv8 = _conv(160, 160, _FULL), _conv(160, 160, _FULL)
        self.conv9, self.conv10 = _SplitConv(160, 160, 160, _FULL), _conv(160, 80, _FLAT)
        self.conv11, self.conv12 = _SplitConv(80, 80, 80, _FULL), _conv(80, 40, _FLAT)
        self.conv13, self.conv14 = _SplitConv(40, 40, 40, _FULL), _conv(40, 20, _FLAT)
        self.binary = out_channels == 2
        self.conv15 = nn.Conv3d(20, 1 if self.binary else out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(n % 27 for n in x.shape[2:]):
            raise ValueError(f"tang2020 input sides must be multiples of 27, got {tuple(x.shape[2:])}")
        if torch.is_grad_enabled():
            logits = self._head(self._forward(x))
        else:
            logits = torch.cat([self._head(self._forward_lean(item[None])) for item in x])
        if self.binary:
            return torch.cat([torch.zeros_like(logits), logits], dim=1)
        return logits

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv15(_normalise_activate(x))

    def _middle_from_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """Everything below full resolution: level 1's max-pooled map in, the coarse map that is
        upsampled to meet level 1's skip out (40 channels, a third of level 1's size minus 8)."""
        na = _normalise_activate
        level2 = self.conv4(na(self.conv3(na(pooled))))
        level3 = self.conv6(na(self.conv5(na(F.max_pool3d(level2, 3)))))
        path = self.conv8(na(self.conv7(na(F.max_pool3d(level3, 3)))))
        for skip, merge, conv in ((level3, self.conv9, self.conv10), (level2, self.conv11, self.conv12)):
            up = _upsample3(path)
            path = conv(na(merge(na(_centre_crop(skip, tuple(up.shape[2:]))), na(up))))
        return path

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """The plain forward pass (training, or small inputs): the map before the head."""
        na = _normalise_activate
        level1 = self.conv2(na(self.conv1(x)))
        up = _upsample3(self._middle_from_pooled(F.max_pool3d(level1, 3)))
        return self.conv14(na(self.conv13(na(_centre_crop(level1, tuple(up.shape[2:]))), na(up))))

    @torch.no_grad()
    def _forward_lean(self, x: torch.Tensor) -> torch.Tensor:
        """The same computation for one input, its full-resolution layers in slabs of slices.

        conv1's output (20 channels) is made whole; level 1 (conv2's 40 channels) is made slab by
        slab, pooled at once, and only its centre (the part the skip keeps, the output's size) is
        held. The upsampled coarse map is made slab by slab twice (its statistics, then its use).
        Peak: two 40-channel maps at output size. Channels-last throughout (oneDNN's fast layout).
        """
        margin, depth = MARGIN, x.shape[4]
        shape = tuple(n - 2 * margin for n in x.shape[2:])
        first = _empty_channels_last(x, self.conv1.out_channels, x.shape[2:])
        for z0, z1 in _slabs(depth):  # conv1 is (3, 3, 1): slabs need no halo
            first[..., z0:z1] = self.conv1(x[..., z0:z1])
        _normalise_activate(first)
        skip = _empty_channels_last(x, self.conv2.out_channels, shape)
        crop = tuple(slice(margin, n - margin) for n in x.shape[2:4])
        pooled = []
        for z0, z1 in _slabs(depth):  # slab edges are multiples of 3: pooling needs no halo
            inp = _pad_slices(first[..., max(z0 - 1, 0) : min(z1 + 1, depth)], z0, z1, depth)
            level1 = F.conv3d(_channels_last(inp), self.conv2.weight, self.conv2.bias, padding=(1, 1, 0))
            pooled.append(F.max_pool3d(level1, 3))
            a, b = max(z0, margin), min(z1, depth - margin)
            if b > a:
                skip[..., a - margin : b - margin] = level1[:, :, crop[0], crop[1], a - z0 : b - z0]
            del level1
        del first
        coarse = self._middle_from_pooled(_channels_last(torch.cat(pooled, dim=4)))
        del pooled
        assert shape == tuple(3 * n - 2 for n in coarse.shape[2:])
        _normalise_activate(skip)
        inner_depth = shape[2]
        up_stats = _Statistics()
        for z0, z1 in _slabs(inner_depth):
            up_stats.add(_upsample3_slices(coarse, z0, z1))
        up_mean, up_std = up_stats.result()
        flat_padding = (1, 1, 0)  # slabs carry their own halo (or zero padding) across slices
        merged = _empty_channels_last(x, self.conv13.conv.out_channels, shape)
        for z0, z1 in _slabs(inner_depth):
            lo, hi = max(z0 - 1, 0), min(z1 + 1, inner_depth)
            skip_part = _pad_slices(skip[..., lo:hi], z0, z1, inner_depth)
            up = _pad_slices(
                _apply_norm_(_upsample3_slices(coarse, lo, hi), up_mean, up_std), z0, z1, inner_depth
            )
            merged[..., z0:z1] = self.conv13(
                _channels_last(skip_part), _channels_last(up), padding=flat_padding
            )
        del skip
        _normalise_activate(merged)
        out = _empty_channels_last(x, self.conv14.out_channels, shape)
        for z0, z1 in _slabs(inner_depth):
            out[..., z0:z1] = self.conv14(_channels_last(merged[..., z0:z1]))  # (3, 3, 1): no halo
        return out
