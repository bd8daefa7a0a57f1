"""The run's resumable state: the Trainer's checkpoint folders and the trainable weights the kit writes into them.

The Trainer saves its optimizer, scheduler and RNG state in `<run>.partial/checkpoints/checkpoint-<step>/`, but
not the weights a LoRA run trains (the adapter, and the TSDAE decoder, which is no part of the model it knows):
the kit writes those itself, as `trainable_state.safetensors`, last, so that a checkpoint holding that file is
complete and `--resume` continues from exactly the same state.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from src.errors import KitError

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"  # the Trainer's folder inside the run folder: resumable states, removed at the end
TRAINABLE_FILE = "trainable_state.safetensors"  # LoRA + decoder weights, beside each checkpoint
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)$")  # the Trainer's own naming (transformers PREFIX_CHECKPOINT_DIR)
# The Trainer keeps this many checkpoints: a kill can interrupt the newest while it is written, and then the one
# before it is what --resume continues from.
SAVE_TOTAL_LIMIT = 2


def checkpoint_step(path: str | Path) -> int | None:
    """The step a checkpoint folder was written at (`checkpoint-30` -> 30); None for any other name."""
    match = CHECKPOINT_NAME.search(Path(path).name)
    return int(match.group(1)) if match else None


def checkpoint_folder(checkpoints: str | Path, step: int) -> Path:
    return Path(checkpoints) / f"checkpoint-{step}"


def last_complete_checkpoint(folder: Path) -> str | None:
    """The newest checkpoint whose writing finished (a kill -9 can interrupt the newest one)."""
    found = [p for p in folder.glob("checkpoint-*") if checkpoint_step(p) is not None]
    for checkpoint in sorted(found, key=checkpoint_step, reverse=True):
        if (checkpoint / TRAINABLE_FILE).exists():
            return str(checkpoint)
        logger.warning("skipping %s: it was not completely written", checkpoint)
    return None


def trainable_state(module: torch.nn.Module) -> dict:
    return {n: p.detach().cpu().contiguous() for n, p in module.named_parameters() if p.requires_grad}


def save_trainable_state(module: torch.nn.Module, path: Path) -> None:
    """Written to a temporary name and renamed into place, so a kill never leaves half a file under `path`."""
    tmp = path.with_name(path.name + ".tmp")
    save_file(trainable_state(module), str(tmp))
    os.replace(tmp, path)


def load_trainable_state(module: torch.nn.Module, state: dict, strict: bool = True) -> None:
    """Copy `state` into `module`'s parameters; strict=False skips names the module no longer has (the TSDAE
    decoder, once training is over)."""
    params = dict(module.named_parameters())
    unknown = [name for name in state if name not in params]
    if strict and unknown:
        raise KitError(f"checkpoint state has weights this model lacks ({unknown[0]}, ...): it was written by another "
                       f"version of the kit or another model; start again with --overwrite")
    with torch.no_grad():
        for name, value in state.items():
            if name in params:
                params[name].copy_(value.to(params[name].device))
