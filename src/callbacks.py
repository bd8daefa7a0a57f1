"""The kit's additions to the training loop, as transformers callbacks (model selection, the largest, has its
own module: src/selection.py).

- `EpochCallback`: the noise and the document pairs redraw every epoch;
- `TrainableStateCallback`: every checkpoint holds the LoRA (and TSDAE decoder) weights (src/checkpoints.py);
- `StopOnSignalCallback`: Ctrl-C or SIGTERM ends with a resumable checkpoint;
- `TrainingBarOnly`: one progress bar.
"""

from __future__ import annotations

import logging
import math
import signal

import torch
from transformers import ProgressCallback, TrainerCallback

from src.checkpoints import TRAINABLE_FILE, checkpoint_folder, save_trainable_state

logger = logging.getLogger(__name__)


class EpochCallback(TrainerCallback):
    """Tell the noise and the document pairs which epoch it is, so every epoch draws them afresh."""

    def __init__(self, epoch_aware: list):
        self.epoch_aware = epoch_aware

    def on_epoch_begin(self, args, state, control, **kwargs):
        for item in self.epoch_aware:
            item.epoch = int(math.floor(state.epoch or 0))


class TrainableStateCallback(TrainerCallback):
    """Write every trainable weight (adapters, and the TSDAE decoder, which the Trainer does not save) into
    each checkpoint, so that a resumed run continues from exactly the same state."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = checkpoint_folder(args.output_dir, state.global_step)
            save_trainable_state(self.model, folder / TRAINABLE_FILE)  # written last: marks the checkpoint complete


class StopOnSignalCallback(TrainerCallback):
    """Ctrl-C (SIGINT) or SIGTERM: finish the current step, write a resumable checkpoint, stop. A second signal
    stops at once (the last regular checkpoint is still there)."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.received:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        logger.warning("%s received: writing a checkpoint after this step, then stopping", self.received)

    def on_step_end(self, args, state, control, **kwargs):
        if self.received:
            control.should_save = control.should_training_stop = True


class TrainingBarOnly(ProgressCallback):
    """The Trainer's training bar without the nested bar it opens for every development-loss pass."""

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        pass
