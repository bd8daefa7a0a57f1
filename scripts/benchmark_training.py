"""Peak memory and speed of one TSDAE training step, design by design, and plain sentence-transformers TSDAE
against the kit's, step for step.

    python scripts/benchmark_training.py                       # e5-small + XLM-R-large-sized, all designs
    python scripts/benchmark_training.py --models e5-small --steps 4 --rounds 4

Designs (batch 8, length 128, AdamW over whatever trains, real Russian catalog texts with 60% deletion):
    old-kit      4-bit encoder + LoRA, sentence-transformers' DenoisingAutoEncoderLoss with an untied decoder
                 (a second fp32 copy of the model, trained in full): the design this kit replaces
    st-tied      full fine-tuning, DenoisingAutoEncoderLoss tied (plain sentence-transformers TSDAE)
    kit-full     full fine-tuning, the kit's shared-layer decoder + corpus-vocabulary chunked loss
    kit-lora     LoRA on a full-precision base, the kit's decoder
    kit-qlora    4-bit NF4 base + LoRA, the kit's decoder (the kit's default precision)
    kit-qlora-gc the same with --gradient_checkpointing (encoder and decoder layers recomputed in backward)

Each design runs in a fresh subprocess, so its peak resident memory (ru_maxrss: everything the process held,
Python and torch included) is its own. `--rounds N` then runs plain sentence-transformers TSDAE and the kit's
QLoRA step in ONE process, alternating, so both see the same machine state, and prints the speed ratio.
XLM-R-large-sized means a randomly initialised 24-layer, 1024-wide XLM-R with e5's 250k-token vocabulary:
weights do not matter for memory and speed. Results: a table on stdout, JSON + Markdown in --output_dir.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DESIGNS = ["old-kit", "st-tied", "kit-full", "kit-lora", "kit-qlora", "kit-qlora-gc"]
PRECISION = {"old-kit": "nf4", "st-tied": "full", "kit-full": "full", "kit-lora": "none", "kit-qlora": "nf4",
             "kit-qlora-gc": "nf4"}
BATCH, LENGTH = 8, 128


def model_path(name: str, workdir: Path) -> str:
    """The bundled default encoder, or a random XLM-R-large-sized one built (once) under workdir."""
    from src.provision import resolve_model

    e5 = resolve_model("intfloat/multilingual-e5-small")
    if name == "e5-small":
        return str(e5)
    folder = workdir / "xlmr-large-random"
    if not (folder / "config.json").exists():
        import torch
        from transformers import AutoTokenizer, XLMRobertaConfig, XLMRobertaModel

        tokenizer = AutoTokenizer.from_pretrained(str(e5))
        torch.manual_seed(0)
        config = XLMRobertaConfig(vocab_size=len(tokenizer), hidden_size=1024, num_hidden_layers=24,
                                  num_attention_heads=16, intermediate_size=4096, max_position_embeddings=514,
                                  pad_token_id=tokenizer.pad_token_id)
        XLMRobertaModel(config, add_pooling_layer=False).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return str(folder)


def batches(model, steps: int, seed: int = 0):
    """`steps` (noisy, original) feature pairs of the longest catalog texts, cut at LENGTH tokens."""
    from src.config import DataConfig, NoiseConfig
    from src.create_dataset import WordNoise, load_training_data

    texts = sorted(load_training_data(DataConfig(), seed).texts, key=len, reverse=True)[: steps * BATCH]
    noise = WordNoise(NoiseConfig(), seed)
    out = []
    for i in range(steps):
        chunk = texts[i * BATCH : (i + 1) * BATCH]
        noisy = [noise(t, j) for j, t in enumerate(chunk)]
        out.append([model.tokenize(noisy), model.tokenize(chunk)])
    return out, texts


def build(design: str, path: str):
    """(model, loss, optimizer) of one design."""
    import torch
    from sentence_transformers.sentence_transformer.losses import DenoisingAutoEncoderLoss

    from src.config import ModelConfig
    from src.model_builder import build_model
    from src.tsdae import TSDAELoss, corpus_vocabulary

    checkpointing = design.endswith("-gc")
    model = build_model(ModelConfig(model_name_or_path=path, precision=PRECISION[design], max_seq_length=LENGTH),
                        gradient_checkpointing=checkpointing)
    if design in ("old-kit", "st-tied"):
        loss = DenoisingAutoEncoderLoss(model, decoder_name_or_path=path, tie_encoder_decoder=design == "st-tied")
    else:
        from src.config import DataConfig, TrainConfig
        from src.create_dataset import load_training_data

        texts = load_training_data(DataConfig(), 0).texts
        loss = TSDAELoss(model, corpus_vocabulary(model, texts), TrainConfig().loss_chunk_tokens, checkpointing)
    params = [p for p in loss.parameters() if p.requires_grad]
    # DenoisingAutoEncoderLoss registers the encoder inside the loss; the kit's loss holds it as `model` too.
    params += [p for p in model.parameters() if p.requires_grad and all(p is not q for q in params)]
    return model, loss, torch.optim.AdamW(params, lr=1e-5)


def step(loss, optimizer, features) -> float:
    started = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    value = loss(features, None)
    value.backward()
    optimizer.step()
    return time.perf_counter() - started


def measure_one(design: str, path: str, steps: int) -> dict:
    import torch

    model, loss, optimizer = build(design, path)
    loss.train()
    data, _ = batches(model, steps)
    times = [step(loss, optimizer, f) for f in data]
    timed = times[1:] or times  # the first step pays for allocation and lazy initialisation
    trainable = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    return {"design": design, "precision": PRECISION[design], "trainable_parameters": trainable,
            "seconds_per_step": round(sum(timed) / len(timed), 3),
            "sentences_per_second": round(BATCH * len(timed) / sum(timed), 3),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2, 3),
            "threads": torch.get_num_threads()}


def alternate(path: str, rounds: int) -> dict:
    """Plain sentence-transformers TSDAE (st-tied) and the kit's QLoRA step, alternating in one process."""
    designs = ("st-tied", "kit-qlora")
    built = {d: build(d, path) for d in designs}
    data = {d: batches(built[d][0], rounds + 1)[0] for d in designs}
    times = {d: [] for d in designs}
    for r in range(rounds + 1):
        for d in designs:
            seconds = step(built[d][1], built[d][2], data[d][r])
            if r:  # round 0 warms both up
                times[d].append(seconds)
    speed = {d: BATCH * rounds / sum(times[d]) for d in designs}
    return {"rounds": rounds, "sentences_per_second": {d: round(v, 3) for d, v in speed.items()},
            "speedup": round(speed["kit-qlora"] / speed["st-tied"], 2)}


def table(rows: list[dict]) -> str:
    lines = ["| model | design | precision | trainable params | s/step | sentences/s | peak RSS (GB) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['design']} | {PRECISION[r['design']]} | - | - | - | failed: {r['error']} |")
            continue
        lines.append(f"| {r['model']} | {r['design']} | {r['precision']} | {r['trainable_parameters'] / 1e6:.1f}M | "
                     f"{r['seconds_per_step']} | {r['sentences_per_second']} | {r['peak_rss_gb']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="e5-small,xlmr-large")
    parser.add_argument("--designs", default=",".join(DESIGNS))
    parser.add_argument("--steps", type=int, default=3, help="training steps per design (the first is not timed)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds, st-tied vs kit-qlora (0 = skip)")
    parser.add_argument("--output_dir", default="runs/benchmark")
    parser.add_argument("--workdir", default="/tmp/e5kit-benchmark")
    parser.add_argument("--one", nargs=3, metavar=("DESIGN", "PATH", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # child process: one design, result as JSON on the last stdout line
        print(json.dumps(measure_one(args.one[0], args.one[1], int(args.one[2]))))
        return

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, results = [], {}
    for name in args.models.split(","):
        path = model_path(name, Path(args.workdir))
        for design in args.designs.split(","):
            print(f"{name} / {design} ...", file=sys.stderr, flush=True)
            proc = subprocess.run([sys.executable, __file__, "--one", design, path, str(args.steps)],
                                  capture_output=True, text=True)
            if proc.returncode < 0:  # the kernel's out-of-memory killer sends SIGKILL
                rows.append({"model": name, "design": design, "error": f"killed by signal {-proc.returncode} "
                                                                      f"(out of memory on this machine?)"})
            elif proc.returncode:
                lines = [l for l in proc.stderr.splitlines() if "Error" in l] or proc.stderr.splitlines()
                error = (lines or [f"exit code {proc.returncode}"])[-1][:120]
                rows.append({"model": name, "design": design, "error": error})
            else:
                rows.append({"model": name, **json.loads(proc.stdout.strip().splitlines()[-1])})
            print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    results["designs"] = rows
    report = ["# TSDAE training step: memory and speed", "", f"batch {BATCH}, length {LENGTH}, "
              f"{args.steps} steps per design (first untimed), fresh process per design.", "", table(rows), ""]
    if args.rounds:
        results["alternating"] = alternate(model_path("e5-small", Path(args.workdir)), args.rounds)
        a = results["alternating"]
        report += [f"Alternating, one process, e5-small, {a['rounds']} rounds: plain sentence-transformers TSDAE "
                   f"{a['sentences_per_second']['st-tied']} sentences/s, kit QLoRA "
                   f"{a['sentences_per_second']['kit-qlora']} sentences/s: **{a['speedup']}x**", ""]
    (out / "benchmark.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (out / "benchmark.md").write_text("\n".join(report), encoding="utf-8")
    print("\n".join(report))


if __name__ == "__main__":
    main()
