"""Soak check: a few hundred training steps, killed with SIGKILL at random moments and resumed each time, must
end with exactly the weights of an uninterrupted run.

    python -m scripts.soak_resume [--steps 300] [--kills 5] [--save_steps 20]

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


def run_killed(model: Path, output_dir: Path, args) -> int:
    """Train into output_dir, SIGKILLed `args.kills` times at random moments after a new checkpoint and resumed
    each time, until the run finishes; -> the number of kills."""
    rng = random.Random(args.seed)
    checkpoints = output_dir.with_name(output_dir.name + ".partial") / CHECKPOINTS
    kills, resumed = 0, False
    while not output_dir.exists():
        proc = subprocess.Popen(command(model, output_dir, args, resumed), cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        resumed, seen = True, last_step(checkpoints)
        while proc.poll() is None and kills < args.kills:
            if last_step(checkpoints) > seen:  # training is under way past a new checkpoint: kill mid-step
                time.sleep(rng.uniform(0.05, 1.0))
                proc.kill()  # SIGKILL: no handler runs, only what is already on disk survives
                proc.wait()
                kills += 1
                print(f"kill {kills}: after checkpoint-{last_step(checkpoints)}")
                break
            time.sleep(0.1)
        if proc.wait() not in (0, -9):
            sys.exit(f"a resumed run failed with exit code {proc.returncode}")
    return kills


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--save_steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="e5kit-soak-"))
    model = save_tiny_bert(work / "model")  # the same tiny model the tests use
    started = time.time()
    subprocess.run(command(model, work / "whole", args, False), cwd=ROOT, check=True, capture_output=True)
    print(f"uninterrupted run: {time.time() - started:.0f} s")
    kills = run_killed(model, work / "killed", args)

    a = load_file(str(work / "whole" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(work / "killed" / "adapter" / "adapter_model.safetensors"))
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    same = a.keys() == b.keys() and worst < 1e-5
    print(f"{args.steps} steps, {kills} kills: max |difference| {worst:.2e} -> "
          f"{'OK, nothing lost' if same else 'DIFFERENT'}")
    sys.exit(0 if same else 1)

if __name__ == "__main__":
    main()
