"""Process-group helpers for training: every one is a no-op on a single process.

Under ``torchrun`` the environment names this process's rank; training uses DDP with gloo on CPU
and NCCL on GPU. Kept apart so the data and the loop modules share them without importing each other.
"""

from __future__ import annotations

import os

import torch

from liverseg.errors import LiversegError


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


def mean_across_ranks(value: float, device: torch.device) -> float:
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return float(t.item()) / torch.distributed.get_world_size()


def pick_device(name: str, local_rank: int) -> torch.device:
    """``auto``/``cpu``/``cuda`` -> a device; ``cuda`` without a GPU is a one-line error."""
    if name not in ("auto", "cpu", "cuda"):
        raise LiversegError(f"unknown device '{name}' (choose auto, cpu or cuda)")
    if name == "cuda" and not torch.cuda.is_available():
        raise LiversegError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank)
