"""Validation during training: sliding-window prediction on whole cached cases, Dice per region."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from liverseg.config import Config


def dice_scores(pred: torch.Tensor, label: torch.Tensor) -> dict[str, float]:
    """Liver (label > 0, the LiTS convention) and tumour (label == 2) Dice; NaN when undefined."""
    from monai.metrics import compute_dice

    out = {}
    for name, p, y in (("liver", pred > 0, label > 0), ("tumour", pred == 2, label == 2)):
        if not y.any():
            out[name] = float("nan")
            continue
        d = compute_dice(p[None, None].float(), y[None, None].float(), include_background=True)
        out[name] = float(d.item())
    return out


def _nanmean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


@torch.no_grad()
def validate(network: nn.Module, cases: list[dict], config: Config, device: torch.device) -> dict:
    """Sliding-window prediction on whole cached cases; mean Dice per region and overall."""
    from monai.inferers import sliding_window_inference

    from liverseg.networks import autocast_dtype, network_margin

    dtype = autocast_dtype(config.train, device)
    was_training = network.training
    network.eval()
    per_case = {}
    margin = network_margin(config.model)
    for case in cases:
        if margin:  # an output smaller than the input: the inference path's margin-aware windows
            from liverseg.bundle import Bundle
            from liverseg.infer import model_probabilities

            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                in_memory = Bundle(Path("."), config, network)
                probs = model_probabilities(case["image"], in_memory, device=device.type)
            per_case[case["case"]] = dice_scores(probs.argmax(0), case["label"][0])
            continue
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = sliding_window_inference(
                case["image"][None].to(device), roi_size=config.train.patch_size,
                sw_batch_size=config.infer.sw_batch_size, predictor=network,
                overlap=config.infer.overlap, mode=config.infer.mode)
        pred = logits.float().argmax(1)[0].cpu()
        per_case[case["case"]] = dice_scores(pred, case["label"][0])
    network.train(was_training)
    liver = _nanmean([d["liver"] for d in per_case.values()])
    tumour = _nanmean([d["tumour"] for d in per_case.values()])
    overall = _nanmean([_nanmean(list(d.values())) for d in per_case.values()])
    return {"dice": overall, "liver": liver, "tumour": tumour, "per_case": per_case}
