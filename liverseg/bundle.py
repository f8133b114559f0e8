"""Model bundles: a folder holding everything inference needs and nothing else.

Layout::

    BUNDLE/
      model.pt          network weights (a state_dict; float16 on disk, float32 in memory)
      plan.json         the recipe: preprocess (spacing, orientation, intensity), model, infer,
                        postprocess, labels, plus "bundle_format"
      model_card.json   provenance: data, command, measured Dice and speed, licence
      model_card.md     the same for people (optional)

A training run directory is itself a bundle, so ``liverseg infer --model RUN_DIR`` works.
"""

from __future__ import annotations

import hashlib
import io as _io
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from liverseg.config import Config, ModelConfig
from liverseg.errors import LiversegError
from liverseg.io import atomic_path, write_text_atomic
from liverseg.networks import build_network, for_inference

BUNDLE_FORMAT = 1
WEIGHTS_FILE = "model.pt"
PLAN_FILE = "plan.json"
CARD_FILE = "model_card.json"
CARD_MD_FILE = "model_card.md"
PACKAGED_MODELS = Path(__file__).parent / "models"
DEFAULT_MODEL = "liver_default"


@dataclass
class Bundle:
    path: Path
    plan: Config
    network: nn.Module
    card: dict = field(default_factory=dict)
    weights_sha256: str = ""

    @property
    def model_id(self) -> str:
        return str(self.card.get("name") or self.path.name)

    @property
    def model_version(self) -> str:
        return str(self.card.get("version", "")) or self.weights_sha256[:12]


def save_bundle(directory: str | Path, plan: Config, state_dict: dict[str, torch.Tensor],
                card: dict | None = None, card_markdown: str | None = None) -> Path:
    """Write a bundle (each file atomically). Weights are stored as float16 to keep bundles small."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    # DynUNet's state_dict names the same tensors under several keys (skip_layers alias the
    # encoder); convert each storage once so the aliases stay shared and are saved once. Aliases
    # are found on the source tensors: a GPU tensor's copy to the CPU is a fresh allocation whose
    # address the next copy may reuse, so the copies' addresses would pair unrelated weights.
    converted: dict[tuple[str, int], torch.Tensor] = {}
    compact = {}
    for key, value in state_dict.items():
        ident = (str(value.device), value.data_ptr())
        if ident not in converted:
            tensor = value.detach().to("cpu")
            converted[ident] = tensor.half() if tensor.is_floating_point() else tensor
        compact[key] = converted[ident]
    # Serialised in memory first: torch.save names the zip's records after the file it writes,
    # so saving to a temporary name would make the same weights give different bytes.
    buffer = _io.BytesIO()
    torch.save(compact, buffer)
    with atomic_path(out / WEIGHTS_FILE) as tmp:
        tmp.write_bytes(buffer.getvalue())
    plan_data = {"bundle_format": BUNDLE_FORMAT, **plan.model_dump(mode="json")}
    write_text_atomic(out / PLAN_FILE, json.dumps(plan_data, indent=2) + "\n")
    if card is not None:
        write_text_atomic(out / CARD_FILE, json.dumps(card, indent=2) + "\n")
    if card_markdown is not None:
        write_text_atomic(out / CARD_MD_FILE, card_markdown)
    return out


def read_plan(directory: str | Path) -> Config:
    path = Path(directory) / PLAN_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LiversegError("not a model bundle (no plan.json); pass a bundle folder made by "
                            "'liverseg train' or omit --model to use the shipped model",
                            directory) from None
    except json.JSONDecodeError as exc:
        raise LiversegError(f"plan.json is not valid JSON ({exc})", path) from None
    version = data.pop("bundle_format", None)
    if version != BUNDLE_FORMAT:
        raise LiversegError(f"bundle format {version!r} is not supported (expected "
                            f"{BUNDLE_FORMAT}); upgrade liverseg or retrain", path)
    try:
        return Config.model_validate(data)
    except Exception as exc:  # pydantic ValidationError: a damaged or foreign plan
        raise LiversegError(f"plan.json does not describe a liverseg model ({exc.__class__.__name__})",
                            path) from None


def default_bundle_path() -> Path:
    return PACKAGED_MODELS / DEFAULT_MODEL


def installed_bundles() -> list[Path]:
    """Bundles shipped inside the package."""
    if not PACKAGED_MODELS.is_dir():
        return []
    return sorted(p for p in PACKAGED_MODELS.iterdir() if (p / PLAN_FILE).is_file())


def resolve_bundle_path(model: str | Path | None) -> Path:
    """A bundle folder from ``--model``: a path, or the name of a bundle shipped with the package
    (``liver_tang2020``); a path that exists wins over a shipped name. None: the default model."""
    if model is None:
        return default_bundle_path()
    path = Path(model)
    shipped = PACKAGED_MODELS / str(model)
    if not path.exists() and len(path.parts) == 1 and (shipped / PLAN_FILE).is_file():
        return shipped
    return path


def load_bundle(directory: str | Path | None = None, device: str | torch.device = "cpu") -> Bundle:
    """Load a bundle (a folder, a shipped model's name, or by default the shipped default model)
    with its network in eval mode."""
    path = resolve_bundle_path(directory)
    if not path.exists():
        if directory is None:
            raise LiversegError("no model is shipped with this installation; pass --model BUNDLE "
                                "(a folder made by 'liverseg train')", path)
        names = ", ".join(p.name for p in installed_bundles()) or "none"
        raise LiversegError(f"model bundle not found; give a bundle folder or a shipped model's name "
                            f"({names}; see 'liverseg models')", path)
    if not path.is_dir():
        raise LiversegError("model bundle must be a folder holding plan.json and model.pt", path)
    plan = read_plan(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise LiversegError(f"model bundle has no {WEIGHTS_FILE}; it is incomplete, re-export it", path)
    raw = weights.read_bytes()
    try:
        state = torch.load(_io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign pickle
        raise LiversegError(f"cannot load weights ({exc.__class__.__name__}); the file is damaged",
                            weights) from None
    network = build_network(plan.model)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        network.load_state_dict(state)
    except RuntimeError:
        raise LiversegError("weights do not match the network described in plan.json", weights) \
            from None
    for_inference(network).eval().to(device)
    card: dict = {}
    card_path = path / CARD_FILE
    if card_path.is_file():
        try:
            card = json.loads(card_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            card = {}
    return Bundle(path=path, plan=plan, network=network, card=card,
                  weights_sha256=hashlib.sha256(raw).hexdigest())


def average_bundles(members: list[str | Path], directory: str | Path, card: dict | None = None) -> Path:
    """Write one bundle whose weights are the mean of ``members``' weights.

    Meant for the stages of one training run: a later stage continues from an earlier one, so
    their weights stay in one basin and their mean is a single network, as fast as either, that
    generalises at least as well (weight averaging, as in SWA and "model soups", Wortsman et al.,
    ICML 2022). Members share the architecture and the preprocessing; the plan is the last one's.
    """
    bundles = [load_bundle(member) for member in members]
    last = bundles[-1]

    def network_and_preprocessing(plan: Config) -> tuple[ModelConfig, object]:
        return plan.model.model_copy(update={"pretrained": None}), plan.preprocess

    for bundle in bundles:
        if network_and_preprocessing(bundle.plan) != network_and_preprocessing(last.plan):
            raise LiversegError(f"cannot average with {last.path}: the network or the preprocessing "
                                "differs", bundle.path)
    states = [bundle.network.state_dict() for bundle in bundles]
    mean = {key: torch.stack([state[key] for state in states]).mean(0) if value.is_floating_point()
            else value for key, value in states[-1].items()}
    # Saved from a network, not from the dict of means: DynUNet's state_dict names some tensors
    # twice, and save_bundle stores such aliases once only when they are one tensor, as in a network
    # (the dict's separate means made bundles of twice the size).
    last.network.load_state_dict(mean)
    return save_bundle(directory, last.plan, last.network.state_dict(), card=card)
