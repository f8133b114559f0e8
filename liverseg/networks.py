"""Networks chosen by name from the config: MONAI parts sized by the plan, and one imported network.

``tang2020`` is the liver U-Net of Tang et al. (EJNMMI 2020, pyliverlesionseg 0.3, KU Leuven,
Apache-2.0), rebuilt here in PyTorch so its published weights run in liverseg's pipeline
(``pipelines/import_tang2020.py`` converts them). Unlike DynUNet its output is smaller than its input
(13 voxels per side) and input sides must be multiples of 27; it lives in :mod:`liverseg.tang2020`.
"""

from __future__ import annotations

import torch
from torch import nn

from liverseg.config import ModelConfig, TrainConfig
from liverseg.errors import LiversegError


def build_network(cfg: ModelConfig) -> nn.Module:
    """A residual 3D U-Net with deep supervision (MONAI DynUNet) or a V-Net (MONAI VNet).

    DynUNet in training mode returns a (B, 1 + deep_supr_num, C, X, Y, Z) stack: the main output
    followed by the deep-supervision heads, all upsampled to the input size; in eval mode it
    returns the main output only.
    """
    if cfg.name == "dynunet":
        from monai.networks.nets import DynUNet

        levels = len(cfg.filters)
        if not (len(cfg.kernel_size) == len(cfg.strides) == levels):
            raise LiversegError(
                f"model.filters, model.kernel_size and model.strides need one entry per level "
                f"(got {levels}, {len(cfg.kernel_size)}, {len(cfg.strides)})")
        if cfg.deep_supervision and not 1 <= cfg.deep_supr_num <= levels - 2:
            raise LiversegError(
                f"model.deep_supr_num must be between 1 and {levels - 2} for {levels} levels")
        norm = ("INSTANCE", {"affine": True}) if cfg.norm == "instance" else "BATCH"
        return DynUNet(
            spatial_dims=3,
            in_channels=cfg.in_channels,
            out_channels=cfg.out_channels,
            kernel_size=cfg.kernel_size,
            strides=cfg.strides,
            upsample_kernel_size=cfg.strides[1:],
            filters=cfg.filters,
            dropout=cfg.dropout or None,
            norm_name=norm,
            deep_supervision=cfg.deep_supervision,
            deep_supr_num=cfg.deep_supr_num,
            res_block=cfg.res_block,
        )
    if cfg.name == "tang2020":
        from liverseg.tang2020 import Tang2020UNet

        return Tang2020UNet(out_channels=cfg.out_channels)
    if cfg.name == "vnet":
        from monai.networks.nets import VNet

        return VNet(spatial_dims=3, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                    dropout_prob_down=cfg.dropout, dropout_prob_up=(cfg.dropout, cfg.dropout))
    raise LiversegError(f"unknown model.name '{cfg.name}' (choose dynunet, vnet or tang2020)")


def network_stride(cfg: ModelConfig) -> int:
    """The factor every input side must be divisible by (product of the strides)."""
    if cfg.name == "vnet":
        return 16
    if cfg.name == "tang2020":
        return 27
    total = 1
    for s in cfg.strides:
        total *= s
    return total


def network_margin(cfg: ModelConfig) -> int:
    """Voxels per side by which the network's output is smaller than its input (0: same size)."""
    return 13 if cfg.name == "tang2020" else 0  # liverseg.tang2020.MARGIN


def for_inference(network: nn.Module) -> nn.Module:
    """The same network with layers swapped for equivalents that run faster on CPU (in place).

    Instance normalisation with affine parameters and no running statistics is group
    normalisation with one channel per group: same statistics, same ``weight``/``bias`` (so the
    same state_dict keys), outputs equal to float rounding (1e-5 on DynUNet's logits), but
    torch's CPU group-norm kernel is several times faster than its instance-norm one, which
    took about a third of a DynUNet forward pass.
    """
    for name, child in network.named_children():
        if isinstance(child, nn.InstanceNorm3d) and child.affine and not child.track_running_stats:
            group = nn.GroupNorm(child.num_features, child.num_features, eps=child.eps, affine=True)
            group.weight, group.bias = child.weight, child.bias
            setattr(network, name, group)
        else:
            for_inference(child)
    return network


def cpu_computes_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX). Elsewhere torch emulates
    it, and a bf16 training step of the v2 recipe took 210 s instead of 2.9 s in float32 (an AVX2
    AMD EPYC, 2026-12-05). Torch's own probes are private, hence the fallback."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def autocast_dtype(train: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The mixed-precision dtype for ``device`` (None: float32): bf16 on GPUs that support it (no
    gradient scaler needed), else fp16 (with one); on the CPU bf16 when ``train.amp_cpu`` is true,
    or is "auto" and the CPU computes bf16 natively."""
    if device.type == "cuda":
        if not train.amp:
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    wanted = cpu_computes_bf16() if train.amp_cpu == "auto" else train.amp_cpu
    return torch.bfloat16 if wanted else None


def load_pretrained(network: nn.Module, cfg: ModelConfig) -> int:
    """Copy ``cfg.pretrained``'s weights (a bundle folder or a shipped model's name) into ``network``;
    returns how many tensors came from it.

    Tensors of the same name and shape are copied. A tang2020 binary head (one channel z, read as
    logits [0, z]) becoming a head of more classes starts as background 0, liver z and the other
    foreground classes z - 4, so the fine-tuned network begins where the pretrained one was (with
    the new classes unlikely). Anything else left unmatched keeps its fresh initialisation.
    """
    from liverseg.bundle import load_bundle

    if cfg.pretrained is None:
        return 0
    source = load_bundle(cfg.pretrained)
    if source.plan.model.name != cfg.name:
        raise LiversegError(f"model.pretrained is a {source.plan.model.name} network but model.name is "
                            f"{cfg.name}; start from weights of the same architecture", source.path)
    theirs = source.network.state_dict()
    ours = network.state_dict()
    copied = {k: v for k, v in theirs.items() if k in ours and ours[k].shape == v.shape}
    head_weight, head_bias = theirs.get("conv15.weight"), theirs.get("conv15.bias")
    if cfg.name == "tang2020" and head_weight is not None and head_weight.shape[0] == 1 \
            and ours["conv15.weight"].shape[0] > 1:
        weight = torch.zeros_like(ours["conv15.weight"])
        bias = torch.zeros_like(ours["conv15.bias"])
        weight[1:] = head_weight
        bias[1] = head_bias[0]
        bias[2:] = head_bias[0] - 4.0
        copied.update({"conv15.weight": weight, "conv15.bias": bias})
    if not copied:
        raise LiversegError("no weight of model.pretrained fits this network; check model settings",
                            source.path)
    network.load_state_dict(copied, strict=False)
    return len(copied)
