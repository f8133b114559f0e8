"""Import the pretrained liver U-Net of Tang et al. 2020 as liverseg/models/liver_tang2020.

    python pipelines/import_tang2020.py                     # fetch the wheel with pip, convert, write
    python pipelines/import_tang2020.py --wheel WHEEL.whl   # convert a wheel already on disk
    python pipelines/import_tang2020.py --out DIR           # write the bundle elsewhere

Source: the PyPI package ``pyliverlesionseg`` 0.3 (KU Leuven; Tang X, Jafargholi Rangraz E, Coudyzer W,
et al., "Whole liver segmentation based on deep learning and manual adjustment for clinical use in
SIRT", EJNMMI Research 2020; Apache-2.0), which ships its trained Keras 2.2 weights inside the wheel.
Installing the package is not needed (it wants Python 3.6 and TensorFlow 1.12): the wheel is a zip,
the weights an HDF5 file read with h5py. Nothing is hand-edited: every number of the bundle comes from
the wheel (weights, voxel size) or from the package's own code (recorded in ``PLAN`` below with the
line it mirrors), and the wheel's SHA-256 is recorded in the card.

Keras stores a 3D kernel as (k1, k2, k3, in, out) over channels-last (x, y, z, c) arrays; PyTorch
wants (out, in, k1, k2, k3) over (c, x, y, z): the spatial axes keep their order, so a transpose
suffices. Layers are matched by name (``conv3d_k`` -> ``convk``), which is also the file's order.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from liverseg.bundle import save_bundle  # noqa: E402
from liverseg.config import Config  # noqa: E402
from liverseg.networks import build_network  # noqa: E402

PACKAGE = "pyliverlesionseg"
VERSION = "0.3"
WEIGHTS = (
    f"{PACKAGE}/trained_models/model_unet_ct_mr_liv_seg_resize_1.5mm_med_3_resize_3mm_20201011_"
    "dice_loss_val_binary_dice_mean.hdf5"
)
LICENCE = f"{PACKAGE}-{VERSION}.dist-info/LICENSE"
OUT = REPO / "liverseg" / "models" / "liver_tang2020"
PARAMETERS = 3_874_961

# The plan, each value from the package's code (cnn_liver_lesion_seg_CT_MR_functions.py):
PLAN = {
    "preprocess": {
        "orientation": "RAS",  # "the input image of the CNN model need to be in RAS orientation"
        # target_spacing: from the HDF5's header/voxel_size (3 mm), filled in by convert()
        # np.clip(img / 1000, -0.2, 0.2) * 2.5: the window [-200, 200] HU onto [-0.5, 0.5], 0 HU -> 0
        "intensity": {"mode": "window", "lower": -200.0, "upper": 200.0, "window_range": [-0.5, 0.5]},
        # Our body crop replaces the package's lung/hip heuristic (which cut livers; see the card).
        "crop_body": True,
        "body_threshold_hu": -500.0,
        "crop_margin_vox": 2,
    },
    "model": {"name": "tang2020", "out_channels": 2},
    "infer": {
        # segment_size = [163, 136, 136] -> input 189 x 162 x 162: the largest window, also ours
        "roi_size": [189, 162, 162],
        "overlap": 0.25,
        "mode": "gaussian",
        "sw_batch_size": 1,
        "tta": False,
        "nested_classes": False,
        # The instance normalisation takes each window's statistics: the padded 189 x 162 x 162 window
        # the original always fed gives its answers; windows shrunk to the body lose 0.01-0.03 Dice.
        "fixed_window": True,
    },
    # Th = 0.5 then the largest component: argmax of [1 - p, p] and liverseg's postprocessing.
    "postprocess": {"largest_component": True, "fill_holes": True, "tumour_inside_liver": True},
    "labels": {"0": "background", "1": "liver"},
}


def fetch_wheel(folder: Path) -> Path:
    """``pip download`` the wheel (no dependencies, no install: it only runs on Python 3.6)."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            "3.6",
            f"{PACKAGE}=={VERSION}",
            "-d",
            str(folder),
        ],
        check=True,
    )
    return next(folder.glob(f"{PACKAGE}-{VERSION}-*.whl"))


def keras_state_dict(hdf5_path: Path) -> tuple[dict[str, torch.Tensor], tuple[float, float, float]]:
    """conv3d_k kernels and biases of the Keras HDF5 as a Tang2020UNet state dict, and its voxel size."""
    import h5py

    state: dict[str, torch.Tensor] = {}
    with h5py.File(hdf5_path, "r") as f:
        spacing = tuple(float(v) for v in f["header/voxel_size"][()])
        for k in range(1, 16):
            group = f[f"conv3d_{k}/conv3d_{k}"]
            kernel = np.asarray(group["kernel:0"], dtype=np.float32)  # (k1, k2, k3, in, out)
            bias = np.asarray(group["bias:0"], dtype=np.float32)
            prefix = f"conv{k}.conv" if k in (9, 11, 13) else f"conv{k}"  # the split convolutions
            state[f"{prefix}.weight"] = torch.from_numpy(
                np.ascontiguousarray(kernel.transpose(4, 3, 0, 1, 2))
            )
            state[f"{prefix}.bias"] = torch.from_numpy(bias)
    return state, spacing  # type: ignore[return-value]


def convert(wheel: Path, out: Path) -> Path:
    wheel_sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as archive:
        weights_path = Path(archive.extract(WEIGHTS, tmp))
        licence_text = archive.read(LICENCE).decode("utf-8")
        weights_sha = hashlib.sha256(weights_path.read_bytes()).hexdigest()
        state, spacing = keras_state_dict(weights_path)
    plan_data = json.loads(json.dumps(PLAN))
    plan_data["preprocess"]["target_spacing"] = list(spacing)
    plan = Config.model_validate(plan_data)
    network = build_network(plan.model)
    network.load_state_dict(state)  # strict: every tensor matched, none left over
    count = sum(p.numel() for p in network.parameters())
    if count != PARAMETERS:
        raise SystemExit(f"parameter count {count} != {PARAMETERS}: the architecture does not match")
    card = model_card(wheel.name, wheel_sha, weights_sha, count)
    save_bundle(out, plan, network.state_dict(), card=card, card_markdown=card_markdown(card))
    (out / "LICENSE").write_text(licence_text, encoding="utf-8")
    return out


def _measured(name: str) -> dict | None:
    path = REPO / "pipelines" / "results" / name
    return json.loads(path.read_text()) if path.is_file() else None


def model_card(wheel_name: str, wheel_sha: str, weights_sha: str, parameters: int) -> dict:
    """The card: origin, licence, what liverseg changed, and what was measured here (from
    pipelines/results/tang2020_verify.json and bench_tang2020.json when present)."""
    return {
        "name": "liver_tang2020",
        "version": f"{PACKAGE}-{VERSION}",
        "description": "Whole-liver segmentation of CT (liver vs background, no tumour class) at 3 mm: the "
        "pretrained U-Net of Tang et al. 2020, imported and run by liverseg's pipeline.",
        "labels": {"0": "background", "1": "liver"},
        "origin": {
            "package": f"{PACKAGE}=={VERSION} (PyPI), KU Leuven",
            "wheel": wheel_name,
            "wheel_sha256": wheel_sha,
            "weights_file": WEIGHTS,
            "weights_sha256": weights_sha,
            "parameters": parameters,
            "paper": "Tang X, Jafargholi Rangraz E, Coudyzer W, Bertels J, Robben D, Schramm G, Deckers W, "
            "Maleux G, Baete K, Verslype C, Gooding MJ, Deroose CM, Nuyts J. Whole liver segmentation "
            "based on deep learning and manual adjustment for clinical use in SIRT. EJNMMI Research "
            "10, 2020. doi:10.1186/s13550-020-00750-w",
            "training_data": "Not documented by the package (CT and MR, about 196 subjects). "
            "It very probably "
            "includes LiTS, hence the 3D-IRCADb-01 CTs (LiTS volumes 28-47): figures on ircadb* "
            "are contaminated; chaos03 (CHAOS test set) is the clean case here.",
            "converted_by": "python pipelines/import_tang2020.py (nothing hand-edited)",
        },
        "licence": "Weights: Apache-2.0 (pyliverlesionseg, KU Leuven; LICENSE in this folder). Training data "
        "undocumented, so research use only.",
        "changes": [
            "Network rebuilt in PyTorch (liverseg/tang2020.py) and the Keras weights transposed "
            "into it; float16 "
            "on disk. The 'linear' upsampling is computed as the trilinear interpolation it equals.",
            "liverseg's reader, orientation and resampling (one area-average/trilinear resampling to 3 mm) "
            "replace the package's 1.5 mm resampling + 3x3x3 median filter + 3 mm resampling.",
            "liverseg's body box (> -500 HU) replaces the package's lung/hip crop, which cut a "
            "quarter of the "
            "liver on chaos01 and the dome on tsexample.",
            "MONAI sliding-window inference with the package's 189x162x162 window (25% overlap, gaussian "
            "blending) over the body box instead of one fixed crop; full-resolution layers run in slabs, "
            "so memory stays bounded.",
            "Probabilities are resampled to the native grid before thresholding at 0.5; liverseg's "
            "postprocessing (largest component, holes filled) replaces erosion + largest component + "
            "dilation at 3 mm and a corner-aligned zoom.",
        ],
        "agreement_with_original": _measured("tang2020_verify.json"),
        "inference": _measured("bench_tang2020.json"),
        "limits": [
            "Liver only: no tumour class. Large tumours at the liver's edge may be left out (ircadb07).",
            "3 mm voxels: boundaries are coarser than a 1 mm model's.",
            "The network normalises each 189x162x162 window with its own statistics; it was built for "
            "abdominal CT (and MR) with the liver in the window.",
        ],
    }


def card_markdown(card: dict) -> str:
    """The card for people."""
    origin = card["origin"]
    lines = [
        f"# {card['name']} ({card['version']})",
        "",
        card["description"],
        "",
        "## Origin and licence",
        "",
        f"- Weights from the PyPI package {origin['package']} (`{origin['weights_file']}`, sha256 "
        f"`{origin['weights_sha256'][:16]}...`), converted by `{origin['converted_by'].split(' (')[0]}`.",
        f"- Paper: {origin['paper']}",
        f"- Licence: {card['licence']} The Apache License 2.0 text is in `LICENSE` beside this card.",
        f"- Training data: {origin['training_data']}",
        "",
        "## What liverseg changed",
        "",
        *(f"- {c}" for c in card["changes"]),
        "",
    ]
    agreement = card.get("agreement_with_original")
    if agreement:
        lines += [
            "## Measured here: against the expert labels and the original pipeline",
            "",
            "`python pipelines/verify_tang2020.py --reference REF` (REF: the package's own masks, "
            "see docs/tang2020.md). Liver Dice:",
            "",
            "| case | liverseg vs label | original vs label | liverseg vs original "
            "| original (no crop) vs label "
            "| liverseg vs original (no crop) |",
            "|---|---|---|---|---|---|",
        ]
        for case, row in agreement["cases"].items():
            orig, nocrop = row.get("orig", {}), row.get("nocrop", {})
            lines.append(
                f"| {case} | {row['dice_ours_vs_label']:.3f} | {orig.get('dice_original_vs_label', '-')} | "
                f"{orig.get('dice_ours_vs_original', '-')} | {nocrop.get('dice_original_vs_label', '-')} | "
                f"{nocrop.get('dice_ours_vs_original', '-')} |"
            )
        lines.append("")
    inference = card.get("inference")
    if inference:
        lines += [
            "## Speed and memory",
            "",
            f"`{inference.get('command', '')}` ({inference.get('machine', '')}):",
            "",
        ]
        lines += [
            "| case | liverseg s | liverseg GB | original s | original GB | speed-up |",
            "|---|---|---|---|---|---|",
        ]
        for case, row in inference.get("cases", {}).items():
            lines.append(
                f"| {case} | {row['liverseg_seconds']} | {row['liverseg_peak_gb']} | "
                f"{row['original_seconds']} | {row['original_peak_gb']} | {row['speedup']}x |"
            )
        lines.append("")
    lines += ["## Limits", "", *(f"- {c}" for c in card["limits"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--wheel", type=Path, help="the pyliverlesionseg 0.3 wheel (default: pip download it)"
    )
    parser.add_argument(
        "--out", type=Path, default=OUT, help=f"bundle folder (default {OUT.relative_to(REPO)})"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel if args.wheel is not None else fetch_wheel(Path(tmp))
        out = convert(wheel, args.out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
