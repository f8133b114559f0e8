"""Learning from a teacher model: its soft targets in the cache, and the distillation loss.

The teacher (by default the imported ``liver_tang2020``, which learnt from about 200 subjects but knows
liver vs not-liver only) segments each cached case's native CT once; its probability of liver,
brought into the case's model space the way the label was, is saved beside the image and label as
``teacher`` (float16) in the case's npz. Training carries it through the patch crop and the spatial
augmentations like the label, and the intensity augmentations (contrast phase, noise, slice
thickness) leave it as it was: the student is asked to give, on a shifted image, what the teacher
gave on the clean one.

Loss: the expert labels keep their Dice + cross-entropy (tumour is ours alone); the teacher adds
``train.teacher_weight`` times the binary cross-entropy between the student's foreground probability
(liver or tumour, 1 - P(background)) and the teacher's P(liver), on the main output; where the
experts drew a tumour the target is foreground (the teacher misses large tumours).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from liverseg.errors import LiversegError
from liverseg.postprocess import TUMOUR

if TYPE_CHECKING:
    from liverseg.bundle import Bundle

TEACHER_KEY = "teacher"


def teacher_probability(image: Path, bundle: Bundle) -> np.ndarray:
    """The teacher's probability of its foreground (1 - P(background)) on the CT's native grid."""
    from liverseg.infer import predict_volume
    from liverseg.io import read_ct

    volume = read_ct(image)
    prediction = predict_volume(volume, bundle, keep_probabilities=True, postprocess=False)
    assert prediction.probabilities is not None
    return 1.0 - prediction.probabilities[0]


def add_teacher_targets(cache: str | Path, model: str | Path = "liver_tang2020", *, force: bool = False,
                        device: str = "cpu", on_case: Callable[[str], None] | None = None) -> list[str]:
    """Save the teacher's soft targets into every case of a preprocess cache; returns the cases
    written. Cases that already hold targets from the same teacher weights are skipped."""
    from liverseg.bundle import load_bundle
    from liverseg.io import atomic_path, write_text_atomic
    from liverseg.modelspace import SpatialRecord, map_to_model_space
    from liverseg.preprocess import case_paths, list_cached_cases, load_cached_case

    bundle = load_bundle(model, device=device)
    stamp = {"model": bundle.model_id, "version": bundle.model_version}
    written = []
    for case_id in list_cached_cases(cache):
        npz_path, json_path = case_paths(cache, case_id)
        cached = load_cached_case(cache, case_id)
        with np.load(npz_path) as stored:
            has_targets = TEACHER_KEY in stored.files
        if not force and has_targets and cached.sidecar.get(TEACHER_KEY) == stamp:
            continue
        source = Path(cached.sidecar["sources"]["image"]["path"])
        if not source.exists():
            raise LiversegError(f"case '{case_id}': its CT {source} is gone; the teacher needs the native CT",
                                cache)
        record = SpatialRecord.from_dict(cached.sidecar["spatial"])
        soft = map_to_model_space(teacher_probability(source, bundle), record).clamp_(0.0, 1.0)
        if tuple(soft.shape) != tuple(cached.image.shape[1:]):
            raise LiversegError(f"case '{case_id}': teacher targets {tuple(soft.shape)} do not match the "
                                f"cached image {tuple(cached.image.shape[1:])}", cache)
        arrays = {"image": cached.image, TEACHER_KEY: soft.numpy().astype(np.float16)}
        if cached.label is not None:
            arrays["label"] = cached.label
        with atomic_path(npz_path) as tmp, tmp.open("wb") as handle:
            np.savez_compressed(handle, **arrays)
        write_text_atomic(json_path, json.dumps({**cached.sidecar, TEACHER_KEY: stamp}, indent=1))
        written.append(case_id)
        if on_case is not None:
            on_case(case_id)
    return written


def distillation_loss(logits: torch.Tensor, teacher: torch.Tensor,
                      label: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy between the student's foreground probability and the teacher's.

    ``logits``: (B, C, ...) with class 0 background; ``teacher``: (B, 1, ...) or (B, ...) in [0, 1].
    ``label`` (class indices shaped like ``teacher``): where the experts drew a tumour the target
    is foreground whatever the teacher says. The teacher knows no tumours, and it leaves large
    ones out of the liver (ircadb07: a quarter of the tumour below 0.5), which would teach the
    student to cut them out too. Computed from log-sum-exps, so it stays finite where the student
    is sure.
    """
    if teacher.dim() == logits.dim() - 1:
        teacher = teacher.unsqueeze(1)
    logits = logits.float()
    log_all = torch.logsumexp(logits, dim=1, keepdim=True)
    log_foreground = torch.logsumexp(logits[:, 1:], dim=1, keepdim=True) - log_all
    log_background = logits[:, :1] - log_all
    target = teacher.float().clamp(0.0, 1.0)
    if label is not None:
        tumour = (label.view_as(target) == TUMOUR).float()
        target = torch.maximum(target, tumour)
    return -(target * log_foreground + (1.0 - target) * log_background).mean()


def main_output(output: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """The full-resolution output of a network (the first head under deep supervision)."""
    return output[0] if isinstance(output, list | tuple) else output
