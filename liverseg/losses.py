"""Training loss: MONAI Dice + cross-entropy over every deep-supervision output.

DynUNet in training mode returns a (B, 1 + n, C, X, Y, Z) stack (main output first, then the
deep-supervision heads, all at input size). Output ``i`` is weighted ``1 / 2**i`` and the weights
are normalised to sum to 1 (as nnU-Net does), so the loss stays on the scale of a single Dice+CE
whatever the number of heads.
"""

from __future__ import annotations

import torch
from torch import nn

from liverseg.config import ModelConfig, TrainConfig
from liverseg.errors import LiversegError


def deep_supervision_weights(levels: int) -> list[float]:
    """``1 / 2**i`` for i in 0..levels-1, normalised to sum to 1."""
    raw = [0.5**i for i in range(max(1, levels))]
    total = sum(raw)
    return [w / total for w in raw]


def split_outputs(output: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
    """A network output as the loss wants it: a list for a deep-supervision stack, else the tensor."""
    if output.dim() == 6:
        return list(torch.unbind(output, dim=1))
    return output


def build_loss(model: ModelConfig, train: TrainConfig) -> nn.Module:
    """Dice + CE (softmax, one-hot targets), optional class weights, wrapped for deep supervision."""
    from monai.losses import DeepSupervisionLoss, DiceCELoss

    weight = None
    if train.class_weights is not None:
        if len(train.class_weights) != model.out_channels:
            raise LiversegError(f"train.class_weights needs one weight per class ({model.out_channels}), "
                                f"got {len(train.class_weights)}")
        weight = torch.tensor(train.class_weights, dtype=torch.float32)
    # Class weights go to the CE term (the rare tumour class); Dice is already size-balanced.
    base = DiceCELoss(to_onehot_y=True, softmax=True, weight=weight, smooth_nr=1e-5, smooth_dr=1e-5)
    levels = 1 + (model.deep_supr_num if model.name == "dynunet" and model.deep_supervision else 0)
    return DeepSupervisionLoss(base, weights=deep_supervision_weights(levels))
