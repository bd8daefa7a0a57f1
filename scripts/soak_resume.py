"""Soak check: a few hundred training steps, killed with SIGKILL at random moments and resumed each time, must
end with exactly the weights of an uninterrupted run.

    python -m scripts.soak_resume [--steps 300] [--kills 5] [--save_kills 2] [--save_steps 20]

Uses a tiny randomly initialised BERT (built here, no download) so that hundreds of steps take a few minutes
on a CPU. Prints one line per kill and a final verdict; exits 1 when anything was lost or differs.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

from scripts.tiny_model import save_tiny_bert
from src.checkpoints import CHECKPOINTS, checkpoint_step

ROOT = Path(__file__).resolve().parent.parent


def command(model: Path, output_dir: Path, args, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "src.trainer", "--model_name_or_path", str(model), "--objective", "tsdae",
           "--max_train_texts", "400", "--max_seq_length", "48", "--batch_size", "4", "--learning_rate", "1e-3",
           "--max_steps", str(args.steps), "--save_steps", str(args.save_steps), "--logging_steps", "10",
           "--select_best", "false", "--eval_data", "", "--output_dir", str(output_dir), "--seed", "7"]
    return cmd + (["--resume"] if resume else [])


def last_step(checkpoints: Path) -> int:
    steps = [checkpoint_step(p) for p in checkpoints.glob("checkpoint-*")] if checkpoints.is_dir() else []
    return max((s for s in steps if s is not None), default=0)


def time_to_kill(partial: Path, seen: int, phase: str, since: float) -> bool:
    """`train`: past a new checkpoint (training under way); `save`: once this process writes the final models
    (a file of adapter/ or merged/ newer than its start)."""
    if phase == "train":
        return last_step(partial / CHECKPOINTS) > seen
    written = [f for folder in ("adapter", "merged") for f in (partial / folder).glob("*") if f.is_file()]
    return any(f.stat().st_mtime > since for f in written)


def run_killed(model: Path, output_dir: Path, args) -> int:
    """Train into output_dir, SIGKILLed `args.kills` times at random moments after a new checkpoint, then
    `args.save_kills` times while the adapter and the merged model are written, resumed each time, until the run
    finishes; -> the number of kills."""
    rng = random.Random(args.seed)
    partial = output_dir.with_name(output_dir.name + ".partial")
    kills, resumed = 0, False
    while not output_dir.exists():
        proc = subprocess.Popen(command(model, output_dir, args, resumed), cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        resumed, seen, since = True, last_step(partial / CHECKPOINTS), time.time()
        phase = "train" if kills < args.kills else "save"
        while proc.poll() is None and kills < args.kills + args.save_kills:
            if time_to_kill(partial, seen, phase, since):  # mid-step, or mid-save
                time.sleep(rng.uniform(0.05, 1.0) if phase == "train" else rng.uniform(0.0, 0.3))
                proc.kill()  # SIGKILL: no handler runs, only what is already on disk survives
                proc.wait()
                kills += 1
                print(f"kill {kills} ({phase}): after checkpoint-{last_step(partial / CHECKPOINTS)}")
                break
            time.sleep(0.01)
        if proc.wait() not in (0, -9):
            sys.exit(f"a resumed run failed with exit code {proc.returncode}")
    return kills


def largest_difference(whole: Path, killed: Path, file: str) -> float:
    a, b = load_file(str(whole / file)), load_file(str(killed / file))
    if a.keys() != b.keys():
        return float("inf")
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--save_steps", type=int, default=20)
    parser.add_argument("--save_kills", type=int, default=2, help="kills while the final models are written")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="e5kit-soak-"))
    model = save_tiny_bert(work / "model")  # the same tiny model the tests use
    started = time.time()
    subprocess.run(command(model, work / "whole", args, False), cwd=ROOT, check=True, capture_output=True)
    print(f"uninterrupted run: {time.time() - started:.0f} s")
    kills = run_killed(model, work / "killed", args)

    worst = max(largest_difference(work / "whole", work / "killed", file)
                for file in ("adapter/adapter_model.safetensors", "merged/model.safetensors"))
    same = worst < 1e-5
    print(f"{args.steps} steps, {kills} kills: max |difference| of the adapter and merged weights {worst:.2e} -> "
          f"{'OK, nothing lost' if same else 'DIFFERENT'}")
    sys.exit(0 if same else 1)

if __name__ == "__main__":
    main()
