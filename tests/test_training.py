"""QLoRA model building, the shared-layer TSDAE decoder, and end-to-end training runs on CPU."""

import dataclasses
import json
import shutil

import pytest
import torch
from conftest import RU_TRAIN, read_texts, run_config

from src.config import ModelConfig
from src.model_builder import (
    QUANTIZE_FROM,
    bf16_enabled,
    build_model,
    checkpointed_every,
    projection_weights,
    resolve_precision,
    trained_precision,
)
from src.objectives.tsdae import TSDAELoss, corpus_vocabulary


def batch(model, texts):
    return [model.tokenize([t[: len(t) // 2] for t in texts]), model.tokenize(texts)]


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_xlmr"])
def test_nf4_trains_only_adapters_and_decoder_with_one_copy_of_the_base(request, fixture):
    import bitsandbytes as bnb

    model = build_model(ModelConfig(model_name_or_path=str(request.getfixturevalue(fixture)), precision="nf4"))
    hf = model[0].auto_model
    linear4 = [m for m in hf.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear4) == 2 * 6  # q, k, v, attention output, intermediate, output per layer
    assert all(not p.requires_grad for m in linear4 for p in m.parameters())
    assert all(m.weight.dtype == torch.uint8 for m in linear4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)

    loss = TSDAELoss(model, corpus_vocabulary(model, read_texts(RU_TRAIN, 20)))
    encoder_ids = {id(p) for p in model.parameters()}
    decoder_params = list(loss.decoder.parameters())
    assert not any(id(p) in encoder_ids for p in decoder_params)  # no second copy of any encoder weight
    assert loss.decoder.encoder is hf
    assert sum(p.numel() for p in decoder_params) < 0.5 * sum(p.numel() for p in hf.parameters())
    before = {n: p.detach().clone() for n, p in hf.named_parameters() if not p.requires_grad}
    value = loss(batch(model, read_texts(RU_TRAIN, 4)))
    value.backward()
    assert torch.isfinite(value)
    assert all(p.grad is not None for p in loss.parameters() if p.requires_grad)
    assert all(torch.equal(before[n], p) for n, p in hf.named_parameters() if n in before)


def test_chunked_corpus_vocab_loss_is_the_full_softmax_restricted(tiny_bert):
    model = build_model(ModelConfig(model_name_or_path=str(tiny_bert), precision="none"))
    texts = read_texts(RU_TRAIN, 6)
    vocab = corpus_vocabulary(model, texts)
    torch.manual_seed(0)
    a = TSDAELoss(model, vocab, chunk_tokens=16).eval()
    torch.manual_seed(0)
    b = TSDAELoss(model, vocab, chunk_tokens=100_000).eval()
    features = batch(model, texts)
    assert torch.allclose(a(features), b(features), atol=1e-5)
    full = TSDAELoss(model, None).eval()
    full.decoder.load_state_dict({k: v for k, v in a.decoder.state_dict().items() if k not in ("bias", "vocab_ids")},
                                 strict=False)
    # Over the whole vocabulary the partition function has more terms: the loss can only be larger.
    assert full(features) > a(features)


def test_checkpointing_every_other_layer_recomputes_half_and_leaves_the_gradients_unchanged(tiny_xlmr):
    """--checkpoint_every 2 recomputes layers 0, 2, ... only; recomputation changes no gradient."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    texts = read_texts(RU_TRAIN, 4)
    grads = {}
    for every in (0, 1, 2):
        torch.manual_seed(0)  # the same LoRA initialisation each time
        model = build_model(ModelConfig(model_name_or_path=str(tiny_xlmr), precision="none"), checkpoint_every=every)
        layers = [m for m in model[0].auto_model.modules() if isinstance(m, GradientCheckpointingLayer)]
        assert [m.gradient_checkpointing for m in layers] == [every > 0 and i % every == 0 for i in range(len(layers))]
        model.train()
        torch.manual_seed(1)  # the same dropout masks (reentrant checkpointing replays the RNG state)
        model(batch(model, texts)[1])["sentence_embedding"].pow(2).sum().backward()
        grads[every] = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    assert all(torch.allclose(a, b, atol=1e-6) for every in (1, 2) for a, b in zip(grads[0], grads[every]))


@pytest.mark.parametrize("precision", ["none", "nf4"])
def test_lora_on_the_top_layers_trains_only_them_and_backward_stops_below(tiny_bert, precision):
    """--lora_layers 1 of 2: adapters on layer 1 alone, no checkpointing (which would send backward through layer
    0), and layer 0 records nothing for backward; more layers than the encoder has is a one-line error."""
    from src.errors import KitError

    cfg = ModelConfig(model_name_or_path=str(tiny_bert), precision=precision, lora_layers=1)
    assert checkpointed_every(cfg, precision, 1) == 0  # what the plan passes: backward stops above layer 0 anyway
    assert checkpointed_every(dataclasses.replace(cfg, lora_layers=2), precision, 1) == 1
    model = build_model(cfg, checkpoint_every=checkpointed_every(cfg, precision, 1))
    hf = model[0].auto_model
    adapted = {n.split("layer.")[1][0] for n, p in hf.named_parameters() if p.requires_grad}
    assert adapted == {"1"} and not any(m.gradient_checkpointing for m in hf.encoder.layer)
    outputs = []
    hf.encoder.layer[0].register_forward_hook(lambda module, inputs, output: outputs.append(output))
    model.train()
    model(batch(model, read_texts(RU_TRAIN, 4))[1])["sentence_embedding"].pow(2).sum().backward()
    below = outputs[0][0] if isinstance(outputs[0], tuple) else outputs[0]
    assert not below.requires_grad  # nothing under the lowest adapter is recorded for backward
    assert all(p.grad is not None for p in hf.parameters() if p.requires_grad)
    all_layers = build_model(ModelConfig(model_name_or_path=str(tiny_bert), precision=precision), checkpoint_every=1)
    assert {n.split("layer.")[1][0] for n, p in all_layers.named_parameters() if p.requires_grad} == {"0", "1"}
    with pytest.raises(KitError, match="option --lora_layers: 3 exceeds the encoder's 2 layers"):
        build_model(ModelConfig(model_name_or_path=str(tiny_bert), precision=precision, lora_layers=3))


def test_training_length_stays_within_the_models_own_limit(tiny_xlmr, caplog):
    """The tiny models are saved with a 64-token limit: 48 is kept, 200 (past it) trains at 64 with a warning,
    0 (auto outside the documents default) is 128, clipped the same way."""
    lengths = [build_model(ModelConfig(model_name_or_path=str(tiny_xlmr), precision="none", max_seq_length=n))
               .max_seq_length for n in (48, 200, 0)]
    assert lengths == [48, 64, 64]
    assert "max_seq_length 200 exceeds the model's own limit: training at 64 tokens" in caplog.text


def test_speed_settings_reach_the_modules(tiny_bert):
    """The kit's speed defaults: no attention dropout (fused SDPA kernel), no LoRA dropout op; other values reach
    the modules; hidden dropout is never touched."""
    model = build_model(ModelConfig(model_name_or_path=str(tiny_bert), precision="none"))
    dropouts = {n: m for n, m in model[0].auto_model.named_modules() if isinstance(m, torch.nn.Dropout)}
    attention = [m.p for n, m in dropouts.items() if n.endswith("attention.self.dropout")]
    assert attention == [0.0, 0.0]
    assert all(m.p == 0.1 for n, m in dropouts.items() if n.endswith("output.dropout"))
    lora_dropouts = [m for n, m in model.named_modules() if n.endswith("lora_dropout.default")]
    assert len(lora_dropouts) == 12 and all(isinstance(m, torch.nn.Identity) for m in lora_dropouts)

    kept = build_model(ModelConfig(model_name_or_path=str(tiny_bert), precision="none", attention_dropout=0.2,
                                   lora_dropout=0.1))
    assert [m.p for n, m in kept[0].auto_model.named_modules() if n.endswith("attention.self.dropout")] == [0.2, 0.2]
    assert all(isinstance(m, torch.nn.Dropout) for n, m in kept.named_modules() if n.endswith("lora_dropout.default"))


def test_tsdae_loss_under_bf16_autocast_matches_fp32(tiny_xlmr):
    """bf16 autocast (the default on CPUs with native bf16) computes the same loss to bf16 precision and trains
    the same parameters; the loss itself is reduced in fp32."""
    model = build_model(ModelConfig(model_name_or_path=str(tiny_xlmr), precision="nf4"))
    texts = read_texts(RU_TRAIN, 8)
    loss = TSDAELoss(model, corpus_vocabulary(model, texts)).eval()
    features = batch(model, texts)
    fp32 = loss(features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = loss(features)
    bf16.backward()
    assert bf16.dtype == torch.float32
    assert abs(bf16.item() - fp32.item()) < 0.02 * fp32.item()
    grads = [p.grad for p in loss.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_bf16_setting(monkeypatch):
    assert bf16_enabled("cpu", "yes") and not bf16_enabled("cpu", "no")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert not bf16_enabled("cpu", "auto")  # no native bf16: emulated bf16 would be slower than fp32
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert bf16_enabled("cpu", "auto")


def encode_both(folder, texts):
    from sentence_transformers import SentenceTransformer

    adapter = SentenceTransformer(str(folder / "adapter"), device="cpu")
    merged = SentenceTransformer(str(folder / "merged"), device="cpu")
    assert "lora" not in str(merged) and not (folder / "merged" / "adapter_config.json").exists()
    return adapter.encode(texts, prompt_name="passage"), merged.encode(texts, prompt_name="passage")


def test_end_to_end_tiny_xlmr_adapter_and_merged_agree(tmp_path, tiny_xlmr):
    from src.trainer import train

    folder = train(run_config(tmp_path, tiny_xlmr, "run", max_steps=4, save_steps=2))
    for name in ("config.json", "training_log.json", "loss.png", "run.json"):
        assert (folder / name).is_file()
    assert json.loads((folder / "run.json").read_text())["bf16"] == bf16_enabled("cpu")  # auto: what the CPU has
    assert not (tmp_path / "run.partial").exists() and not (folder / "checkpoints").exists()
    a, m = encode_both(folder, read_texts(RU_TRAIN, 5))
    assert ((a * m).sum(1) > 0.999).all()


def test_end_to_end_e5_small_qlora(tmp_path, e5_cache):
    from src.trainer import train

    cfg = run_config(tmp_path, e5_cache, "e5", max_steps=2, save_steps=10)
    cfg.train.learning_rate = 2e-5
    folder = train(cfg)
    texts = read_texts(RU_TRAIN, 4)
    a, m = encode_both(folder, texts)
    assert ((a * m).sum(1) > 0.999).all()


def test_torchrun_two_cpu_processes_write_one_model(tmp_path, tiny_bert):
    """Data-parallel TSDAE (the decoder's weights all-reduced with the adapters) on CPU with gloo."""
    import os
    import socket
    import subprocess
    import sys

    from conftest import ROOT

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "src.trainer", "--model_name_or_path", str(tiny_bert), "--objective", "tsdae",
           "--train_file", str(RU_TRAIN), "--max_train_texts", "120", "--max_seq_length", "32", "--batch_size", "4",
           "--max_steps", "4", "--eval_steps", "2", "--dev_distractors", "20", "--eval_data", "",
           "--output_dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "merged" / "model.safetensors").is_file() and (out / "adapter").is_dir()
    assert not (tmp_path / "ddp.partial").exists()
    assert json.loads((out / "run.json").read_text())["steps"] == 4


def test_saved_e5_models_encode_documents_with_the_passage_prompt(tmp_path, tiny_xlmr):
    from sentence_transformers import SentenceTransformer

    from src.run_folder import save_models

    cfg = ModelConfig(model_name_or_path=str(tiny_xlmr), precision="none")
    save_models(build_model(cfg), cfg, tmp_path)  # as the trainer saves: adapter/ and merged/
    texts = read_texts(RU_TRAIN, 3)
    for folder in ("adapter", "merged"):
        model = SentenceTransformer(str(tmp_path / folder), device="cpu")  # sentence-transformers alone, no kit
        assert model.prompts["document"] == "passage: "
        assert torch.allclose(torch.tensor(model.encode_document(texts)),
                              torch.tensor(model.encode(texts, prompt="passage: ")))
        assert torch.allclose(torch.tensor(model.encode_query(texts)),
                              torch.tensor(model.encode(texts, prompt="query: ")))
        assert not torch.allclose(torch.tensor(model.encode_document(texts)), torch.tensor(model.encode(texts)))


def assert_png(path, min_bytes=10_000):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > min_bytes  # a real picture, not an empty canvas


LOG_HISTORY = [{"loss": 2.8 - 0.02 * s, "step": s} for s in (1, 10, 20, 30, 40)] + [
    {"eval_loss": 2.3 - 0.01 * s, "eval_dev_cosine_ndcg@10": 0.4 + 0.001 * s, "step": s} for s in (20, 40)]


@pytest.mark.parametrize("dev", [True, False, "monitor"], ids=["with development evaluation", "without",
                                                                "with a monitor"])
def test_loss_plot_is_written(tmp_path, dev):
    from src.plots import plot_loss

    history = LOG_HISTORY if dev else [h for h in LOG_HISTORY if "eval_loss" not in h]
    dev_history = [[0, 0.40], [20, 0.43], [40, 0.42]] if dev else None
    monitor = [[0, 0.70], [20, 0.72], [40, 0.65]] if dev == "monitor" else None
    plot_loss(tmp_path / "loss.png", history, "mnrl", "e5-small-ru", dev_history, 20 if dev else None, 0.5, monitor)
    assert_png(tmp_path / "loss.png")


def run_summary(**changes):
    summary = {"objective": "mnrl", "objective_requested": "auto", "train_texts": 0, "train_pairs": 2451,
               "dev_texts": 0, "dev_pairs": 122, "steps": 77, "train_seconds": 389.0, "device": "cpu",
               "selected": {"step": 70, "dev_ndcg@10": 0.812}, "lora_scale": 0.5,
               "dev_ndcg@10_by_step": [[0, 0.75], [70, 0.812], [77, 0.81]], "peak_memory_gb": 3.7,
               "total_seconds": 746.0,
               "evaluation": {"verdict": "better", "ndcg@10": {"difference": 0.0602, "ci95": [0.042, 0.0789],
                                                               "p_value": 0.0005},
                              "adapted": {"ndcg@10": 0.8161}, "base": {"ndcg@10": 0.7559}}}
    return {**summary, **changes}


def test_final_summary_says_what_was_trained_kept_saved_and_measured(tmp_path):
    from src.run_summary import summary_lines

    final = tmp_path / "e5-small-ru"
    (final / "merged").mkdir(parents=True)
    (final / "adapter").mkdir()
    lines = summary_lines(run_summary(), final)
    assert lines[0] == "objective mnrl (chosen by --objective auto): 2451 training pairs, 77 steps"
    assert lines[1] == "kept: step 70 (development nDCG@10 75.00 at step 0 -> 81.20), adapter scale 0.5"
    assert lines[2] == f"saved: {final}/ merged/ (standalone model), adapter/ (LoRA adapter)"
    assert ".partial" not in lines[2]
    assert lines[3] == ("held-out nDCG@10: base 75.59 -> adapted 81.61, +6.02 [95% CI +4.20, +7.89]: "
                        "better than the base model")
    assert lines[4] == "time 12.4 min in all (6.5 min training); peak resident memory 3.70 GB (before evaluation)"

    worse = run_summary(objective="lead", objective_requested="lead", train_texts=340, train_pairs=0, selected=None,
                        evaluation={**run_summary()["evaluation"], "verdict": "worse"})
    lines = summary_lines(worse, final)
    assert lines[0] == "objective lead: 340 training texts, 77 steps"
    assert lines[1] == "kept: the last step (77), no model selection"
    assert lines[3].endswith("WORSE than the base model: keep using the base model")
    base_kept = summary_lines(run_summary(selected={"step": 0, "dev_ndcg@10": 0.75}, evaluation=None), final)
    assert "the base model unchanged" in base_kept[1]
    assert base_kept[3] == "held-out evaluation: not run (no --eval_data)"


def test_log_counts_only_what_the_objective_trains_on():
    from src.run_summary import training_counts

    assert training_counts("mnrl", 0, 150, 0, 39) == "150 training pairs; development: 39 held-out pairs"
    assert training_counts("lead", 340, 0, 84, 0) == "340 training texts; development: 84 held-out texts"
    assert training_counts("tsdae+mnrl", 150, 150, 39, 39) == ("150 training texts and 150 training pairs; "
                                                               "development: 39 held-out pairs")


def test_selection_evaluator_encodes_in_bf16_and_returns_fp32(tiny_bert):
    """Model selection's evaluations encode under bf16 autocast when training does, and score fp32 embeddings
    equal to the fp32 ones within bf16 precision."""
    from sentence_transformers import SentenceTransformer

    from src.selection import SelectionEvaluator

    model = SentenceTransformer(str(tiny_bert), device="cpu")
    texts = read_texts(RU_TRAIN, 8)
    corpus, queries = {str(i): t for i, t in enumerate(texts)}, {"q": texts[0][:40]}
    fp32, bf16 = (SelectionEvaluator(queries, corpus, {"q": {"0": 1}}, bf16=on).embed_inputs(model, texts)
                  for on in (False, True))
    assert fp32.dtype == bf16.dtype == torch.float32 and not torch.equal(fp32, bf16)
    assert torch.allclose(fp32, bf16, atol=0.05, rtol=0.05)


def test_precision_auto_quantizes_only_encoders_whose_projections_are_large(tiny_bert, tmp_path):
    """auto: none for a small encoder (4-bit would save nothing), nf4 once the layers' projections reach
    QUANTIZE_FROM weights; explicit choices are kept."""
    assert projection_weights(tiny_bert) == 2 * (4 * 32 * 32 + 2 * 32 * 64)
    assert trained_precision(build_model(ModelConfig(model_name_or_path=str(tiny_bert)))) == "none"
    assert trained_precision(build_model(ModelConfig(model_name_or_path=str(tiny_bert), precision="nf4"))) == "nf4"
    assert trained_precision(build_model(ModelConfig(model_name_or_path=str(tiny_bert), precision="full"))) == "full"
    large = tmp_path / "large"
    shutil.copytree(tiny_bert, large)
    config = json.loads((large / "config.json").read_text())
    (large / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 24, "hidden_size": 1024,
                                                   "intermediate_size": 4096}))
    assert projection_weights(large) >= QUANTIZE_FROM
    assert resolve_precision(ModelConfig(model_name_or_path=str(large))) == "nf4"
