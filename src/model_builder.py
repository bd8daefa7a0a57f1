"""Load an encoder as a SentenceTransformer, in the precision the run asks for, with LoRA adapters.

- A sentence-transformers folder keeps its own modules (pooling, normalization) and prompts.
- A plain Hugging Face BERT / XLM-R folder gets mean pooling + L2 normalization, as e5 uses.
- precision `nf4`: 4-bit NF4 base weights with double quantization (bitsandbytes; CUDA and CPU) + LoRA;
  `none`: LoRA on a full-precision base; `full`: every weight trains; `auto`: nf4 where 4-bit pays (QUANTIZE_FROM).

    python -m src.model_builder --model_name_or_path intfloat/multilingual-e5-small --precision nf4
prints the modules, the trainable and frozen parameter counts, and the memory the weights take.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Transformer
from transformers.modeling_layers import GradientCheckpointingLayer

from src.cli import parse_config
from src.config import ModelConfig
from src.errors import KitError, first_line, run_cli
from src.provision import E5_PROMPTS, e5_document_prompt, mean_pooled, resolve_model
from src.settings import comma_list

# `--max_seq_length 0` outside the documents default (src/plan.py): pairs and short texts fit in 128 tokens
TRAIN_MAX_SEQ_LENGTH = 128

logger = logging.getLogger(__name__)

SUPPORTED_TYPES = ("bert", "xlm-roberta", "roberta")
# Linear layers inside the encoder blocks of BERT-family models: attention q/k/v/output and feed-forward.
LAYER_LINEAR = re.compile(r"(^|\.)(encoder\.layer\.\d+\..*\.(query|key|value|dense))$")
LAYER_INDEX = re.compile(r"encoder\.layer\.(\d+)\.")


def pick_device(requested: str = "auto") -> str:
    if requested == "cuda" and not torch.cuda.is_available():
        raise KitError("option --device cuda: no CUDA GPU is available on this machine (use --device cpu)")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def bf16_enabled(device: str, setting: str = "auto") -> bool:
    """Whether to train in bf16 mixed precision: `auto` wherever the hardware computes bf16 natively (CUDA GPUs
    that support it; CPUs with AVX512-BF16 or AMX, where oneDNN runs bf16 matmuls at twice the fp32 rate)."""
    if setting != "auto":
        return setting == "yes"
    if device == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _check_weights(path: Path, cfg: ModelConfig) -> None:
    """Refuse pickle-only weights unless allowed (a pickle can run code when loaded)."""
    names = {p.name for p in path.rglob("*") if p.is_file()}
    has_safe = any(n.endswith(".safetensors") for n in names)
    has_pickle = any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in names if n != "training_args.bin")
    if has_pickle and not has_safe and not cfg.allow_pickle:
        raise KitError(f"model {path} has only pickle-based weights (.bin); convert them to safetensors, or "
                       f"pass --allow_pickle if you trust the source")


def encoder_config(path: Path) -> dict:
    """config.json of a supported encoder folder, or a one-line error saying why the folder is not one."""
    config_file = path / "config.json"
    if not config_file.exists():
        raise KitError(f"model {path}: no config.json, so it is not a Hugging Face encoder folder")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.get("model_type", "") not in SUPPORTED_TYPES:
        raise KitError(f"model {path}: model_type '{config.get('model_type', '')}' is not a supported encoder "
                       f"({', '.join(SUPPORTED_TYPES)})")
    return config


# --precision auto. 4-bit keeps the encoder layers' projection weights in an eighth of their fp32 bytes, and
# bitsandbytes dequantizes them at every matmul: a slower step. That pays from QUANTIZE_FROM such weights (BERT or
# XLM-R large: 302M, a gigabyte saved). e5-small has 21M (its 96M embedding weights are never quantized): on a
# catalog step 4-bit took more memory, not less, and the 4-bit round trip lowered the base model's development
# score (docs/RESULTS.md, "Catalog with titles").
QUANTIZE_FROM = 100_000_000


def projection_weights(path: Path) -> int:
    """Weights of the encoder layers' linear projections, from config.json (BERT/XLM-R: query, key, value and
    attention output, and the two feed-forward matrices)."""
    config = encoder_config(path)
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    return config["num_hidden_layers"] * (4 * hidden * hidden + 2 * hidden * inner)


def resolve_precision(cfg: ModelConfig) -> str:
    """--precision as the run trains: `auto` -> nf4 from QUANTIZE_FROM projection weights, else none."""
    if cfg.precision != "auto":
        return cfg.precision
    weights = projection_weights(resolve_model(cfg.model_name_or_path))
    precision = "nf4" if weights >= QUANTIZE_FROM else "none"
    logger.info("precision auto -> %s: %.0fM projection weights in the encoder layers (4-bit from %.0fM)", precision,
                weights / 1e6, QUANTIZE_FROM / 1e6)
    return precision


def trained_precision(model: SentenceTransformer) -> str:
    """What a built model trains as: nf4 (4-bit base + LoRA), none (LoRA) or full."""
    hf_model = model[0].auto_model
    if getattr(hf_model, "is_loaded_in_4bit", False):
        return "nf4"
    return "none" if any("lora_" in n for n, _ in hf_model.named_parameters()) else "full"


def quantization_config(device: str):
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    # The pooler is never used by mean pooling, and a checkpoint without pooler weights (e5) gets a fresh
    # one that peft's 4-bit dispatch trips over: keep it out of quantization.
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute, llm_int8_skip_modules=["pooler"])


def load_sentence_transformer(cfg: ModelConfig, device: str = "cpu", quantize: bool = False) -> SentenceTransformer:
    """The encoder as a SentenceTransformer (4-bit base when `quantize`), without adapters, with its own
    maximum length."""
    path = resolve_model(cfg.model_name_or_path)
    if (path / "adapter_config.json").exists():
        raise KitError(f"model {path} is a LoRA adapter; train from its base model instead")
    _check_weights(path, cfg)
    encoder_config(path)
    model_kwargs = {"use_safetensors": not cfg.allow_pickle}
    if quantize:
        model_kwargs.update(quantization_config=quantization_config(device), device_map=device)
    kwargs = dict(device=device, trust_remote_code=cfg.trust_remote_code, model_kwargs=model_kwargs)
    try:
        if (path / "modules.json").exists():
            model = SentenceTransformer(str(path), **kwargs)
        else:  # plain HF encoder: mean pooling + normalization, as e5 uses
            transformer = Transformer(str(path), model_kwargs=model_kwargs,
                                      config_kwargs={"trust_remote_code": cfg.trust_remote_code})
            model = mean_pooled(transformer, E5_PROMPTS if "e5" in path.name.lower() else None, device)
    except (OSError, ValueError) as exc:
        raise KitError(f"model {path}: cannot load ({first_line(exc)})") from exc
    return e5_document_prompt(model)  # the trainer's adapter/ and merged/ are saved from models loaded here


def keep_trainable_4bit_layout(hf_model: torch.nn.Module) -> None:
    """bitsandbytes repacks 4-bit CPU weights into an inference-only layout the first time a layer runs in
    eval mode without gradients (a development-loss evaluation, say); training steps after that fail
    ("a view of a leaf Variable ... in-place"). Training needs the canonical layout, so switch that off."""
    for module in hf_model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def set_attention_dropout(hf_model: torch.nn.Module, p: float) -> None:
    """Training-time dropout on the attention weights. With p = 0, BERT/XLM-R's SDPA attention runs PyTorch's
    fused kernel instead of the math path that materialises and masks the weights."""
    for name, module in hf_model.named_modules():
        if name.endswith("attention.self.dropout") and isinstance(module, torch.nn.Dropout):
            module.p = p


def lora_targets(hf_model: torch.nn.Module, spec: str, top_layers: int) -> list[str]:
    """Full names of the modules LoRA adapts: `auto` = every Linear in the encoder blocks, of the top `top_layers`."""
    names = [n for n, m in hf_model.named_modules() if LAYER_LINEAR.search(n) and len(list(m.children())) == 0]
    if spec != "auto":
        wanted = set(comma_list(spec))
        names = [n for n, m in hf_model.named_modules() if n.split(".")[-1] in wanted and "encoder.layer." in n]
    if not names:
        raise KitError(f"option --lora_target_modules: '{spec}' matches no module of the encoder layers")
    lowest = hf_model.config.num_hidden_layers - top_layers
    return [n for n in names if int(LAYER_INDEX.search(n).group(1)) >= lowest]


def adapted_layers(requested: int, layers: int) -> int:
    """How many encoder layers LoRA adapts, from the top: `--lora_layers`, or (0) all of them."""
    if requested > layers:
        raise KitError(f"option --lora_layers: {requested} exceeds the encoder's {layers} layers")
    return requested or layers


def checkpointed_every(cfg: ModelConfig, precision: str, requested: int) -> int:
    """Every how many encoder layers backward recomputes (`requested`: --checkpoint_every, 0 without
    --gradient_checkpointing): none where LoRA adapts at most half the layers from the top, as --lora_layers' help
    says (backward stops there, so the saved activations are few)."""
    layers = encoder_config(resolve_model(cfg.model_name_or_path))["num_hidden_layers"]
    top = layers if precision == "full" else adapted_layers(cfg.lora_layers, layers)
    return 0 if 2 * top <= layers else requested


def world_size() -> int:
    """Processes in this run: torchrun sets WORLD_SIZE (and RANK); a plain `python -m` run is one process."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def world_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def checkpointing_kwargs() -> dict:
    """Reentrant checkpointing peaks lower (docs/RESULTS.md, "Training memory and speed"), but it runs a separate
    backward per layer, and the TSDAE decoder passes through the same layers again: DDP would see a parameter
    reported ready twice. So: non-reentrant under torchrun only."""
    return {"use_reentrant": world_size() == 1}


def checkpoint_layers(hf_model: torch.nn.Module, every: int) -> None:
    """Recompute only every `every`-th encoder layer in backward (transformers turns all of them on); the others
    keep their activations. On an e5-small catalog step every other layer gave much of the speed of no
    checkpointing for under half of its extra memory (docs/RESULTS.md, "one catalog step")."""
    layers = [m for m in hf_model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = layer.gradient_checkpointing and i % every == 0


def training_length(requested: int, own: int | None) -> int:
    """Tokens per training text: the requested length, at most the model's own limit (beyond it the position
    embeddings run out, or the model was never trained there). Saved models get their own limit back (trainer)."""
    if own and requested > own:
        logger.warning("max_seq_length %d exceeds the model's own limit: training at %d tokens", requested, own)
        return own
    return requested


def build_model(cfg: ModelConfig, device: str = "cpu", checkpoint_every: int = 0, max_seq_length: int = 0,
                precision: str = "") -> SentenceTransformer:
    """The encoder ready to train: 4-bit + LoRA (nf4), fp + LoRA (none) or all weights trainable (full), with every
    `checkpoint_every`-th encoder layer recomputed in backward (0: gradient checkpointing off), at `max_seq_length`
    tokens, at most the model's own limit. The trainer passes its plan's values; without them (a benchmark, this
    module's CLI), --precision and --max_seq_length as `resolve_precision` and TRAIN_MAX_SEQ_LENGTH resolve them."""
    from peft import LoraConfig, prepare_model_for_kbit_training

    precision = precision or resolve_precision(cfg)
    model = load_sentence_transformer(cfg, device, quantize=precision == "nf4")
    requested = max_seq_length or cfg.max_seq_length or TRAIN_MAX_SEQ_LENGTH
    model.max_seq_length = training_length(requested, model.max_seq_length)
    hf_model = model[0].auto_model
    set_attention_dropout(hf_model, cfg.attention_dropout)
    layers = hf_model.config.num_hidden_layers
    top = layers if precision == "full" else adapted_layers(cfg.lora_layers, layers)
    if top < layers:
        logger.info("LoRA on the top %d of %d encoder layers", top, layers)
    if precision == "nf4":
        prepare_model_for_kbit_training(hf_model, use_gradient_checkpointing=checkpoint_every > 0,
                                        gradient_checkpointing_kwargs=checkpointing_kwargs())
        keep_trainable_4bit_layout(hf_model)
    elif checkpoint_every:
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs())
    if checkpoint_every:
        checkpoint_layers(hf_model, checkpoint_every)
    if precision == "full":
        return model
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=lora_targets(hf_model, cfg.lora_target_modules, top), bias="none")
    model.add_adapter(lora)
    return model


def parameter_report(model: torch.nn.Module) -> dict:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    weight_bytes += sum(b.numel() * b.element_size() for b in model.buffers())
    return {"trainable_parameters": trainable, "frozen_parameters": total - trainable,
            "weight_megabytes": round(weight_bytes / 2**20, 1)}


def main(argv=None) -> None:
    cfg = parse_config(argv)
    model = build_model(cfg.model, pick_device(cfg.train.device))
    print(model)
    print(json.dumps(parameter_report(model), indent=2))


if __name__ == "__main__":
    run_cli(main)
