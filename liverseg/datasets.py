"""Finding cases in the dataset layouts users already have.

Recognised, in this order:

* Medical Segmentation Decathlon: ``dataset.json`` with ``training`` pairs (``imagesTr/``,
  ``labelsTr/``); also the two folders without ``dataset.json``.
* nnU-Net v2: ``imagesTr/CASE_0000.nii.gz`` (channel suffix) with ``labelsTr/CASE.nii.gz``.
* LiTS: ``volume-N.nii`` with ``segmentation-N.nii`` anywhere below the folder.
* A CSV file of ``image,label`` rows (header optional; paths relative to the CSV).
* A folder of images and/or DICOM series folders without labels (for inference).
* A single image file or a single DICOM series folder.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

from liverseg.errors import LiversegError
from liverseg.io import IMAGE_SUFFIXES, case_name, dicom_series, is_image_file

DEFAULT_LABELS: dict[int, str] = {0: "background", 1: "liver", 2: "tumour"}
_NNUNET_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_LITS_VOLUME = re.compile(r"^volume-(?P<n>\d+)$")


@dataclass(frozen=True)
class Case:
    case_id: str
    image: Path
    label: Path | None = None


@dataclass
class Dataset:
    root: Path
    layout: str
    cases: list[Case]
    labels: dict[int, str]

    @property
    def labelled(self) -> list[Case]:
        return [c for c in self.cases if c.label is not None]


def find_dataset(path: str | Path, require_labels: bool = False) -> Dataset:
    """Recognise a dataset layout and list its cases; a one-line error when nothing is found."""
    root = Path(path)
    if not root.exists():
        raise LiversegError("dataset not found; check the path", root)
    if root.is_file():
        if root.suffix.lower() == ".csv":
            dataset = _from_csv(root)
        else:
            dataset = Dataset(root.parent, "file", [Case(case_name(root), root)], dict(DEFAULT_LABELS))
    elif (root / "dataset.json").is_file():
        dataset = _from_msd(root)
    elif (root / "imagesTr").is_dir():
        dataset = _from_image_label_folders(root / "imagesTr", root / "labelsTr", root, "msd")
    else:
        dataset = _from_lits(root) or _from_folder(root)
    if not dataset.cases and root.is_dir() and _looks_like_dicom(root):
        raise LiversegError(
            "folder holds DICOM-like files but no readable DICOM image series; point to a folder of "
            "CT slices, or check that the files are complete DICOM images", root)
    if not dataset.cases:
        raise LiversegError(
            "no cases found; expected an MSD/nnU-Net dataset (dataset.json, imagesTr/, labelsTr/), "
            "LiTS files (volume-N.nii, segmentation-N.nii), a CSV of image,label pairs, "
            "CT images or DICOM series folders", root)
    if require_labels and not dataset.labelled:
        raise LiversegError("dataset has images but no labels; training and scoring need labels",
                            root)
    names = [c.case_id for c in dataset.cases]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise LiversegError(f"case names are not unique ({', '.join(duplicates[:5])}); "
                            "rename the files so each case has its own name", root)
    return dataset


def _looks_like_dicom(folder: Path) -> bool:
    """Files named *.dcm or without a suffix (as DICOM exporters write them), none of them images."""
    return any(p.is_file() and (p.suffix.lower() in {".dcm", ".ima", ""}) for p in folder.iterdir())


def _labels_from_json(data: dict) -> dict[int, str]:
    labels = data.get("labels")
    if not isinstance(labels, dict) or not labels:
        return dict(DEFAULT_LABELS)
    out: dict[int, str] = {}
    for key, value in labels.items():
        if str(key).isdigit():  # MSD: {"0": "background"}
            out[int(key)] = str(value)
        elif isinstance(value, int):  # nnU-Net v2: {"background": 0}
            out[value] = str(key)
    return out or dict(DEFAULT_LABELS)


def _from_msd(root: Path) -> Dataset:
    path = root / "dataset.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LiversegError(f"dataset.json is not valid JSON ({exc})", path) from None
    labels = _labels_from_json(data)
    entries = data.get("training")
    if not isinstance(entries, list) or not entries:  # nnU-Net v2 dataset.json lists no pairs
        ds = _from_image_label_folders(root / "imagesTr", root / "labelsTr", root, "nnunet")
        ds.labels = labels
        return ds
    cases = []
    for entry in entries:
        image = (root / entry["image"]).resolve() if isinstance(entry, dict) else None
        if image is None:
            raise LiversegError("dataset.json 'training' entries must have 'image' and 'label'", path)
        label = (root / entry["label"]).resolve() if entry.get("label") else None
        cases.append(Case(case_name(image), image, label))
    return Dataset(root, "msd", cases, labels)


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if is_image_file(p))


def _from_image_label_folders(images: Path, labels: Path, root: Path, layout: str) -> Dataset:
    label_files = {case_name(p): p for p in _image_files(labels)}
    cases = []
    for image in _image_files(images):
        name = case_name(image)
        match = _NNUNET_CHANNEL.match(name)
        if match:
            if match["channel"] != "0000":
                continue  # liverseg uses one CT channel; other channels are not CT
            name = match["case"]
            layout = "nnunet"
        cases.append(Case(name, image, label_files.get(name)))
    return Dataset(root, layout, cases, dict(DEFAULT_LABELS))


def _from_lits(root: Path) -> Dataset | None:
    volumes = sorted(p for p in root.rglob("volume-*") if is_image_file(p))
    if not volumes:
        return None
    segmentations = {case_name(p).split("-", 1)[1]: p for p in root.rglob("segmentation-*")
                     if is_image_file(p)}
    cases = []
    for volume in volumes:
        match = _LITS_VOLUME.match(case_name(volume))
        if match:
            cases.append(Case(f"volume-{match['n']}", volume, segmentations.get(match["n"])))
    return Dataset(root, "lits", cases, dict(DEFAULT_LABELS))


def _from_csv(path: Path) -> Dataset:
    cases = []
    with path.open(newline="", encoding="utf-8") as handle:
        for row_number, row in enumerate(csv.reader(handle), start=1):
            cells = [cell.strip() for cell in row]
            if not cells or not cells[0] or cells[0].startswith("#"):
                continue
            if row_number == 1 and cells[0].lower() in {"image", "img", "ct", "volume"}:
                continue  # header
            image = (path.parent / cells[0]).resolve()
            label = (path.parent / cells[1]).resolve() if len(cells) > 1 and cells[1] else None
            cases.append(Case(case_name(image), image, label))
    return Dataset(path.parent, "csv", cases, dict(DEFAULT_LABELS))


def _from_folder(root: Path) -> Dataset:
    """A DICOM series folder, or a folder of CT files and DICOM series folders."""
    if dicom_series(root):
        return Dataset(root.parent, "dicom", [Case(root.name, root)], dict(DEFAULT_LABELS))
    cases = [Case(case_name(p), p) for p in _image_files(root)]
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        if dicom_series(sub):
            cases.append(Case(sub.name, sub))
    return Dataset(root, "folder", cases, dict(DEFAULT_LABELS))


__all__ = ["DEFAULT_LABELS", "IMAGE_SUFFIXES", "Case", "Dataset", "find_dataset"]
