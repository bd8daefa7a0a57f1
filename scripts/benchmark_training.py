"""Peak memory and speed of one TSDAE training step, design by design, and plain sentence-transformers TSDAE
against the kit's, step for step.

    python -m scripts.benchmark_training                       # e5-small + XLM-R-large-sized, all designs
    python -m scripts.benchmark_training --models e5-small --designs st-tied,kit-qlora-gc --rounds 4

Designs (batch 8, length 128, AdamW over whatever trains, real Russian catalog texts with 60% deletion):
    old-kit      4-bit encoder + LoRA, sentence-transformers' DenoisingAutoEncoderLoss with an untied decoder
                 (a second fp32 copy of the model, trained in full): the design this kit replaces
    st-tied      full fine-tuning, DenoisingAutoEncoderLoss tied (plain sentence-transformers TSDAE)
    kit-full     full fine-tuning, the kit's shared-layer decoder + corpus-vocabulary chunked loss
    kit-lora     LoRA on a full-precision base, the kit's decoder
    kit-qlora    4-bit NF4 base + LoRA, the kit's decoder, without gradient checkpointing
    kit-qlora-gc the kit's default step: the same with gradient checkpointing (layers recomputed in backward)
Kit designs run with the kit's defaults (no LoRA or attention dropout, bf16 autocast where the CPU computes bf16
natively); plain sentence-transformers keeps the model's dropout and fp32, as its users run it.

Each design runs in a fresh subprocess, so its peak resident memory (ru_maxrss: everything the process held,
Python and torch included) is its own. `--rounds N` then runs plain sentence-transformers TSDAE and the kit's
steps in ONE process, alternating, so all see the same machine state, and prints the speed ratios.
`--quality_steps N` trains plain sentence-transformers TSDAE, the kit's default step, and the kit's step with its
speed settings undone (kit-qlora-gc+fp32+dropout) on the same N batches and compares their held-out nDCG@10
(paired bootstrap over queries): the speed must not cost quality.
XLM-R-large-sized means a randomly initialised 24-layer, 1024-wide XLM-R with e5's 250k-token vocabulary:
weights do not matter for memory and speed. Results: a table on stdout, JSON + Markdown in --output_dir.
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from src.metrics import format_difference, format_p
from src.settings import comma_list

DESIGNS = ["old-kit", "st-tied", "kit-full", "kit-lora", "kit-qlora", "kit-qlora-gc"]
PRECISION = {"old-kit": "nf4", "st-tied": "full", "kit-full": "full", "kit-lora": "none", "kit-qlora": "nf4",
             "kit-qlora-gc": "nf4"}
# A kit design can undo its speed settings, to show what they alone change: `+dropout` (the model's attention
# dropout and LoRA dropout 0.05, as plain sentence-transformers and the old kit train) and `+fp32` (no bf16).
MODEL_DROPOUT = {"lora_dropout": 0.05, "attention_dropout": 0.1}  # e5's (and XLM-R's) own attention dropout
BATCH, LENGTH = 8, 128
ALTERNATING = ("st-tied", "kit-qlora-gc", "kit-qlora")  # plain ST first: the speed-ups are relative to it
QUALITY = "st-tied,kit-qlora-gc,kit-qlora-gc+fp32+dropout"  # the first is the reference of the others


def precision_of(design: str) -> str:
    return PRECISION[design.split("+")[0]]


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


def noisy_batches(model, texts: list[str], seed: int = 0) -> list:
    """(noisy, original) feature pairs, BATCH texts each, with the kit's 60% word deletion."""
    from src.config import NoiseConfig
    from src.noise import WordNoise

    noise = WordNoise(NoiseConfig(), seed)
    out = []
    for start in range(0, len(texts) - BATCH + 1, BATCH):
        chunk = texts[start : start + BATCH]
        out.append([model.tokenize([noise(t, start + j) for j, t in enumerate(chunk)]), model.tokenize(chunk)])
    return out


@functools.cache
def training_texts() -> tuple[str, ...]:
    """The bundled catalog's training texts, read once per process (every kit design needs them for its
    decoder vocabulary, every timing for its batches)."""
    from src.config import DataConfig
    from src.create_dataset import load_training_data

    return tuple(load_training_data(DataConfig(), 0).texts)


def longest_batches(model, steps: int) -> list:
    """`steps` batches of the longest catalog texts, cut at LENGTH tokens: every batch is full length."""
    return noisy_batches(model, sorted(training_texts(), key=len, reverse=True)[: steps * BATCH])


def build(design: str, path: str, lr: float = 1e-5):
    """(model, loss, optimizer, bf16) of one design. Kit designs use the kit's defaults (ModelConfig,
    TrainConfig: no LoRA or attention dropout, bf16 where the CPU has it); plain sentence-transformers keeps the
    model's own dropout and fp32, as its users run it, and the old kit its LoRA dropout of 0.05."""
    import torch
    from sentence_transformers.sentence_transformer.losses import DenoisingAutoEncoderLoss

    from src.config import ModelConfig, TrainConfig
    from src.model_builder import bf16_enabled, build_model
    from src.objectives.tsdae import TSDAELoss, corpus_vocabulary

    name, *undone = design.split("+")
    if name not in PRECISION or not set(undone) <= {"dropout", "fp32"}:
        raise SystemExit(f"unknown design {design}: choose from {', '.join(PRECISION)}, kit ones with +dropout/+fp32")
    kit, checkpointing = name.startswith("kit-"), name.endswith("-gc")
    settings = MODEL_DROPOUT if not kit or "dropout" in undone else {}
    model = build_model(ModelConfig(model_name_or_path=path, precision=PRECISION[name], max_seq_length=LENGTH,
                                    **settings), checkpoint_every=int(checkpointing))
    if not kit:
        loss = DenoisingAutoEncoderLoss(model, decoder_name_or_path=path, tie_encoder_decoder=name == "st-tied")
    else:
        vocab = corpus_vocabulary(model, list(training_texts()))
        loss = TSDAELoss(model, vocab, TrainConfig().loss_chunk_tokens, checkpointing)
    params = [p for p in loss.parameters() if p.requires_grad]
    # DenoisingAutoEncoderLoss registers the encoder inside the loss; the kit's loss holds it as `model` too.
    params += [p for p in model.parameters() if p.requires_grad and all(p is not q for q in params)]
    bf16 = kit and "fp32" not in undone and bf16_enabled("cpu", TrainConfig().bf16)
    return model, loss, torch.optim.AdamW(params, lr=lr), bf16


def step(loss, optimizer, features, bf16: bool) -> float:
    import torch

    started = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        value = loss(features, None)
    value.backward()
    optimizer.step()
    return time.perf_counter() - started


def measure_one(design: str, path: str, steps: int) -> dict:
    import torch

    model, loss, optimizer, bf16 = build(design, path)
    loss.train()
    times = [step(loss, optimizer, f, bf16) for f in longest_batches(model, steps)]
    timed = times[1:] or times  # the first step pays for allocation and lazy initialisation
    trainable = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    return {"design": design, "precision": precision_of(design), "bf16": bf16, "trainable_parameters": trainable,
            "seconds_per_step": round(sum(timed) / len(timed), 3),
            "sentences_per_second": round(BATCH * len(timed) / sum(timed), 3),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2, 3),
            "threads": torch.get_num_threads()}


def alternate(path: str, rounds: int) -> dict:
    """Plain sentence-transformers TSDAE and the kit's step (default, and without checkpointing), alternating in
    one process over the same full-length batches, so all see the same machine state."""
    built = {}
    for d in ALTERNATING:
        model, loss, optimizer, bf16 = build(d, path)
        built[d] = (loss, optimizer, bf16, longest_batches(model, rounds + 1))
    times = {d: [] for d in ALTERNATING}
    for r in range(rounds + 1):
        for d, (loss, optimizer, bf16, data) in built.items():
            seconds = step(loss, optimizer, data[r], bf16)
            if r:  # round 0 warms every design up
                times[d].append(seconds)
    speed = {d: BATCH * rounds / sum(times[d]) for d in ALTERNATING}
    return {"rounds": rounds, "sentences_per_second": {d: round(v, 3) for d, v in speed.items()},
            "speedup": {d: round(speed[d] / speed["st-tied"], 2) for d in ALTERNATING[1:]}}


def train_and_save(design: str, path: str, texts: list[str], lr: float, seed: int, folder: Path) -> float:
    """One design trained on `texts` (BATCH a step, the kit's noise), saved as the kit saves under folder/design;
    -> training sentences per second."""
    import torch
    from tqdm.auto import tqdm

    from src.config import ModelConfig
    from src.run_folder import save_models

    torch.manual_seed(seed)  # same LoRA and decoder initialisation for every kit design
    model, loss, optimizer, bf16 = build(design, path, lr)
    loss.train()
    seconds = sum(step(loss, optimizer, f, bf16) for f in tqdm(noisy_batches(model, texts, seed), desc=design))
    model.eval()
    (folder / design).mkdir(parents=True, exist_ok=True)
    save_models(model, ModelConfig(model_name_or_path=path, precision=precision_of(design)), folder / design)
    return round(len(texts) / seconds, 3)


def quality(path: str, designs: list[str], steps: int, lr: float, folder: Path, seed: int = 0) -> dict:
    """Each design trained on the same `steps` x BATCH random training texts (same order, same noise, AdamW at
    the same learning rate), saved as the kit saves, then scored with the base model on the held-out catalog
    pairs; every design is compared with the first and with the base. Also each design's training speed on
    natural text lengths (the alternating rounds use only full-length batches)."""
    import random
    import shutil

    from src.config import EvalConfig
    from src.encoding import load_model
    from src.evaluation import evaluate_model
    from src.metrics import compare
    from src.retrieval_data import load_retrieval_data

    shutil.rmtree(folder, ignore_errors=True)
    texts = list(training_texts())
    random.Random(seed).shuffle(texts)
    texts = texts[: steps * BATCH]
    speed = {design: train_and_save(design, path, texts, lr, seed, folder) for design in designs}
    trained = {"base": path, **{design: str(folder / design / "merged") for design in designs}}
    eval_cfg = EvalConfig()
    data = load_retrieval_data(eval_cfg.eval_data)
    per_query = {name: evaluate_model(load_model(p), data, eval_cfg)["per_query"] for name, p in trained.items()}
    rows = [{"design": d, "ndcg@10": round(100 * float(per_query[d]["ndcg@10"].mean()), 2),
             "vs_base": compare(per_query[d], per_query["base"])["ndcg@10"],
             "vs_reference": compare(per_query[d], per_query[designs[0]])["ndcg@10"] if d != designs[0] else None,
             "training_sentences_per_second": speed[d]} for d in designs]
    return {"steps": steps, "sentences": len(texts), "learning_rate": lr, "eval_data": eval_cfg.eval_data,
            "queries": len(data.queries), "base_ndcg@10": round(100 * float(per_query["base"]["ndcg@10"].mean()), 2),
            "designs": rows}


def table(rows: list[dict]) -> str:
    lines = ["| model | design | precision | bf16 | trainable params | s/step | sentences/s | peak RSS (GB) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['design']} | {precision_of(r['design'])} | - | - | - | - | "
                         f"failed: {r['error']} |")
            continue
        lines.append(f"| {r['model']} | {r['design']} | {r['precision']} | {r['bf16']} | "
                     f"{r['trainable_parameters'] / 1e6:.1f}M | "
                     f"{r['seconds_per_step']} | {r['sentences_per_second']} | {r['peak_rss_gb']} |")
    return "\n".join(lines)


def quality_table(q: dict) -> str:
    def ci(c: dict | None) -> str:
        if c is None:
            return ""
        return f"{format_difference(c)}, p {format_p(c['p_value'], '= ')}"

    reference = q["designs"][0]["design"]
    lines = [f"Quality after equal training: {q['sentences']} random training texts "
             f"({q['steps']} batches of {BATCH}), "
             f"AdamW lr {q['learning_rate']}, held-out {q['queries']} queries of {q['eval_data']}:", "",
             f"| design | nDCG@10 | vs base [95% CI] | vs {reference} [95% CI] | training sentences/s |",
             "|---|---|---|---|---|", f"| base | {q['base_ndcg@10']} | | | |"]
    lines += [f"| {r['design']} | {r['ndcg@10']} | {ci(r['vs_base'])} | {ci(r['vs_reference'])} | "
              f"{r['training_sentences_per_second']} |" for r in q["designs"]]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="e5-small,xlmr-large")
    parser.add_argument("--designs", default=",".join(DESIGNS))
    parser.add_argument("--steps", type=int, default=3, help="training steps per design (the first is not timed)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating rounds, plain ST vs the kit's steps (0 = skip)")
    parser.add_argument("--quality_steps", type=int, default=100,
                        help="train each quality design this many batches, then compare held-out nDCG@10 (0 = skip)")
    parser.add_argument("--quality_designs", default=QUALITY, help="the first is the reference of the others")
    parser.add_argument("--quality_lr", type=float, default=3e-5, help="learning rate of both (the TSDAE paper's)")
    parser.add_argument("--output_dir", default="runs/benchmark")
    parser.add_argument("--workdir", default="/tmp/e5kit-benchmark")
    parser.add_argument("--one", nargs=3, metavar=("DESIGN", "PATH", "STEPS"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def measure_in_child(name: str, design: str, path: str, steps: int) -> dict:
    """One design measured in a fresh process (`--one`), so that its peak memory is its own; -> its table row."""
    proc = subprocess.run([sys.executable, "-m", "scripts.benchmark_training", "--one", design, path, str(steps)],
                          capture_output=True, text=True)
    if proc.returncode < 0:  # the kernel's out-of-memory killer sends SIGKILL
        return {"model": name, "design": design, "error": f"killed by signal {-proc.returncode} "
                f"(out of memory on this machine?)"}
    if proc.returncode:
        lines = [ln for ln in proc.stderr.splitlines() if "Error" in ln] or proc.stderr.splitlines()
        return {"model": name, "design": design, "error": (lines or [f"exit code {proc.returncode}"])[-1][:120]}
    return {"model": name, **json.loads(proc.stdout.strip().splitlines()[-1])}


def main() -> None:
    args = parse_args()
    if args.one:  # child process: one design, result as JSON on the last stdout line
        print(json.dumps(measure_one(args.one[0], args.one[1], int(args.one[2]))))
        return

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in comma_list(args.models):
        path = model_path(name, Path(args.workdir))
        for design in comma_list(args.designs):
            print(f"{name} / {design} ...", file=sys.stderr, flush=True)
            rows.append(measure_in_child(name, design, path, args.steps))
            print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    results = {"designs": rows}
    report = ["# TSDAE training step: memory and speed", "", f"batch {BATCH}, length {LENGTH}, "
              f"{args.steps} steps per design (first untimed), fresh process per design.", "", table(rows), ""]
    e5 = model_path("e5-small", Path(args.workdir))
    if args.rounds:
        a = results["alternating"] = alternate(e5, args.rounds)
        report += [f"Alternating, one process, e5-small, {a['rounds']} rounds of full-length batches, sentences/s: "
                   + ", ".join(f"{d} {v}" for d, v in a["sentences_per_second"].items()) + "; speed-up over plain "
                   "sentence-transformers: " + ", ".join(f"**{d} {v}x**" for d, v in a["speedup"].items()), ""]
    if args.quality_steps:
        q = results["quality"] = quality(e5, comma_list(args.quality_designs), args.quality_steps, args.quality_lr,
                                         Path(args.workdir) / "quality")
        report += [quality_table(q), ""]
    (out / "benchmark.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (out / "benchmark.md").write_text("\n".join(report), encoding="utf-8")
    print("\n".join(report))

if __name__ == "__main__":
    main()
