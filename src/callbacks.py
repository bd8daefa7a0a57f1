"""The kit's additions to the training loop, as transformers callbacks, and the trainable state they keep.

- `EpochCallback`: the noise and the document pairs redraw every epoch;
- `TrainableStateCallback` + `last_complete_checkpoint`: every checkpoint holds the LoRA (and TSDAE decoder)
  weights, written last, so that `--resume` continues from exactly the same state;
- `DecoderWarmupCallback`: the TSDAE decoder learns alone for its first steps;
- `BestStateCallback` + `choose_lora_scale`: model selection on development pairs, step 0 (the base) included;
- `StopOnSignalCallback`: Ctrl-C or SIGTERM ends with a resumable checkpoint;
- `TrainingBarOnly`: one progress bar.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import ProgressCallback, TrainerCallback

from src.selection import DEV_NAME, MONITOR_NAME

logger = logging.getLogger(__name__)
# A smaller adapter scale must beat the adapter as trained by this much development nDCG@10 to replace it: on
# about a hundred development queries, smaller differences are noise, and following noise costs test quality.
MIN_SCALE_GAIN = 0.005
CHECKPOINTS = "checkpoints"  # the Trainer's folder inside the run folder: resumable states, removed at the end
TRAINABLE_FILE = "trainable_state.safetensors"  # LoRA + decoder weights, beside each checkpoint
BEST_FILE = "best_state.safetensors"  # trainable state of the best development evaluation
HISTORY_FILE = "selection_history.json"  # every development (and monitor) score so far, for --resume


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
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            save_trainable_state(self.model, folder / TRAINABLE_FILE)  # written last: marks the checkpoint complete


def last_complete_checkpoint(folder: Path) -> str | None:
    """The newest checkpoint whose writing finished (a kill -9 can interrupt the newest one)."""
    candidates = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for checkpoint in candidates:
        if (checkpoint / TRAINABLE_FILE).exists():
            return str(checkpoint)
        logger.warning("skipping %s: it was not completely written", checkpoint)
    return None


class DecoderWarmupCallback(TrainerCallback):
    """For the first `steps` optimizer steps only the decoder's new weights learn. Its cross-attention starts
    random, so the encoder's early gradients would chase a decoder that cannot yet read a sentence vector."""

    def __init__(self, encoder_params: list[torch.nn.Parameter], steps: int):
        self.encoder_params, self.steps = encoder_params, steps

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step < self.steps:
            for p in self.encoder_params:
                p.grad = None  # AdamW skips parameters without a gradient


class BestStateCallback(TrainerCallback):
    """Model selection: after each development evaluation, keep the trainable state with the best development
    nDCG@10 (on disk, so a resumed run remembers it). Step 0 is the base model itself (LoRA starts as a no-op),
    so when training never beats the base on development data, the base is what gets restored. The monitor's
    scores (--monitor_data), when there are any, are recorded beside the development scores and never selected on."""

    def __init__(self, model: torch.nn.Module, folder: Path):
        self.model, self.file, self.record = model, folder / BEST_FILE, folder / "best.json"
        saved = json.loads(self.record.read_text()) if self.record.exists() else {}  # a resumed run's best so far
        self.best, self.step = saved.get("dev_ndcg@10", -math.inf), saved.get("step")
        # beside the checkpoints (removed with them when the run is finished): a resumed run keeps its history
        self.history_file = folder / CHECKPOINTS / HISTORY_FILE
        kept = json.loads(self.history_file.read_text()) if self.history_file.exists() else {}
        self.history: list[tuple[int, float]] = [tuple(p) for p in kept.get("dev", [])]
        self.monitor: list[tuple[int, float]] = [tuple(p) for p in kept.get("monitor", [])]

    def resume_at(self, step: int) -> None:
        """Forget the evaluations after `step` (-1: all of them), where a (resumed) run starts: they come again."""
        self.history = [p for p in self.history if p[0] <= step]
        self.monitor = [p for p in self.monitor if p[0] <= step]

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if dev_score(metrics or {}) is not None:  # one call per development dataset; the evaluator runs once
            self.consider(state.global_step, metrics, state.is_world_process_zero)

    def consider(self, step: int, metrics: dict, main_process: bool = True) -> None:
        score, watched = dev_score(metrics), dev_score(metrics, MONITOR_NAME)
        self.history.append((step, score))
        if watched is not None:
            self.monitor.append((step, watched))
        if main_process:
            self.history_file.parent.mkdir(parents=True, exist_ok=True)
            self.history_file.write_text(json.dumps({"dev": self.history, "monitor": self.monitor}) + "\n")
        if score > self.best and main_process:
            self.best, self.step = score, step
            save_trainable_state(self.model, self.file)
            self.record.write_text(json.dumps({"step": step, "dev_ndcg@10": score}) + "\n")
            logger.info("step %d: development nDCG@10 %.4f, the best so far", step, score)

    def restore(self) -> dict | None:
        if not self.file.exists():
            return None
        load_trainable_state(self.model, load_file(str(self.file)), strict=False)
        record = json.loads(self.record.read_text())
        logger.info("restored the best development state: step %d (nDCG@10 %.4f)", record["step"],
                    record["dev_ndcg@10"])
        return record


def choose_lora_scale(model: torch.nn.Module, evaluator, best: BestStateCallback, scales: list[float]) -> float:
    """Interpolate between the base model (scale 0) and the selected state (1) by scaling every LoRA B matrix,
    and keep the scale with the best development nDCG@10, if it beats the adapter as trained by at least
    MIN_SCALE_GAIN (else scale 1 stays). Fine-tuning that moved too far often does better
    part of the way back (Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022: WiSE-FT).
    Scale 0 already competed as step 0, so only the scales in between are tried."""
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    if not lora_b or not scales or not best.step:
        return 1.0
    trained = [p.detach().clone() for p in lora_b]

    def set_scale(scale: float) -> None:
        with torch.no_grad():
            for p, t in zip(lora_b, trained):
                p.copy_(t * scale)

    scores = {1.0: best.best}
    for scale in scales:
        set_scale(scale)
        scores[scale] = dev_score(evaluator(model))
        logger.info("adapter at scale %.2f: development nDCG@10 %.4f", scale, scores[scale])
    chosen = max(scores, key=lambda k: (scores[k], k))
    chosen = chosen if scores[chosen] - scores[1.0] >= MIN_SCALE_GAIN else 1.0
    set_scale(chosen)
    logger.info("adapter scale %.2f kept (development nDCG@10 %.4f; as trained %.4f)", chosen, scores[chosen],
                scores[1.0])
    return chosen


def dev_score(metrics: dict, evaluator: str = DEV_NAME) -> float | None:
    """nDCG@10 of one evaluator (model selection's, or the monitor's) in an evaluation's metrics, as the trainer
    logs them (`eval_dev_cosine_ndcg@10`) or as the evaluator returns them (`dev_cosine_ndcg@10`)."""
    prefixes = (f"{evaluator}_", f"eval_{evaluator}_")
    return next((v for k, v in metrics.items() if k.startswith(prefixes) and k.endswith("ndcg@10")), None)


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
    with torch.no_grad():
        for name, value in state.items():
            if not strict and name not in params:
                continue
            params[name].copy_(value.to(params[name].device))


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
