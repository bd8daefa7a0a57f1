"""tsdae: a denoising auto-encoder on single texts, with a decoder that reuses the encoder's own (4-bit,
LoRA-adapted) layers.

Reference: Wang, Reimers, Gurevych, "TSDAE: Using Transformer-based Sequential Denoising Auto-Encoder for
Unsupervised Sentence Embedding Learning", Findings of EMNLP 2021.

sentence-transformers' `DenoisingAutoEncoderLoss` builds its decoder as a second Hugging Face model. Untied,
that is a full-precision copy trained in full, which undoes QLoRA's saving; tied, it shares parameters by
reassigning them, which cannot work over 4-bit layers with LoRA injected. So the decoder here is written by
hand: it runs the encoder's embeddings, self-attention and feed-forward modules themselves (one copy of the
base weights in memory, the LoRA adapters shared, as in the paper's best, tied setting) under a causal mask,
and owns only what a decoder needs and the encoder lacks: a cross-attention per layer and the LM-head
transform and bias. The output projection is the (tied) word-embedding matrix.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import TrainerCallback

from src.noise import WordNoise, noisy_dataset
from src.objectives.base import BuildInputs, Objective, ObjectiveSpec

logger = logging.getLogger(__name__)


class SentenceCrossAttention(nn.Module):
    """Cross-attention from every target position to the single sentence vector.

    With one key, the attention weight is softmax([x]) = 1 whatever the query and key projections are: they
    get no gradient, and the result is W_o W_v s at every position. So this keeps only that one H x H map
    (the same function class as BERT's cross-attention, half its weights) plus its residual LayerNorm, and
    computes it once per sentence instead of once per token.
    """

    def __init__(self, hidden_size: int, layer_norm_eps: float, dropout: float):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        nn.init.normal_(self.dense.weight, std=0.02)
        nn.init.zeros_(self.dense.bias)

    def forward(self, hidden: torch.Tensor, sentence: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(hidden + self.dropout(self.dense(sentence))[:, None, :])


class SharedLayerDecoder(nn.Module):
    """A causal decoder over the encoder's own layers, conditioned on one sentence vector.

    Args:
        encoder: the Hugging Face BERT/XLM-R model inside the SentenceTransformer (possibly 4-bit + LoRA).
            It is held by reference, not registered, so its weights are neither copied nor saved twice.
        vocab_ids: token ids the output softmax ranges over (None = the whole vocabulary).
        gradient_checkpointing: recompute each decoder layer in backward.
    """

    def __init__(self, encoder: nn.Module, vocab_ids: torch.Tensor | None = None,
                 gradient_checkpointing: bool = False):
        super().__init__()
        self._encoder = [encoder]
        config = encoder.config
        hidden, eps = config.hidden_size, config.layer_norm_eps
        self.cross = nn.ModuleList(SentenceCrossAttention(hidden, eps, config.hidden_dropout_prob)
                                   for _ in range(config.num_hidden_layers))
        self.transform = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=eps))
        vocab_size = config.vocab_size if vocab_ids is None else len(vocab_ids)
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        self.gradient_checkpointing = gradient_checkpointing
        if vocab_ids is not None:
            label_map = torch.full((config.vocab_size,), -1, dtype=torch.long)
            label_map[vocab_ids] = torch.arange(len(vocab_ids))
            self.register_buffer("vocab_ids", vocab_ids.clone(), persistent=True)
            self.register_buffer("label_map", label_map, persistent=False)
        else:
            self.vocab_ids = self.label_map = None

    @property
    def encoder(self) -> nn.Module:
        return self._encoder[0]

    def _causal_mask(self, attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        length = attention_mask.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
        allowed = causal[None, None] & attention_mask[:, None, None, :].bool()
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)

    def _layer(self, layer, cross, hidden, mask, sentence):
        attended = layer.attention(hidden, attention_mask=mask)[0]
        return layer.feed_forward_chunk(cross(attended, sentence))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, sentence: torch.Tensor) -> torch.Tensor:
        """Hidden states [batch, length, hidden] for predicting each next token."""
        hidden = self.encoder.embeddings(input_ids=input_ids)
        mask = self._causal_mask(attention_mask, hidden.dtype)
        sentence = sentence.to(hidden.dtype)
        for layer, cross in zip(self.encoder.encoder.layer, self.cross):
            if self.gradient_checkpointing and self.training:
                hidden = checkpoint(self._layer, layer, cross, hidden, mask, sentence, use_reentrant=False)
            else:
                hidden = self._layer(layer, cross, hidden, mask, sentence)
        return hidden

    def output_weight(self) -> torch.Tensor:
        weight = self.encoder.embeddings.word_embeddings.weight
        return weight if self.vocab_ids is None else weight.index_select(0, self.vocab_ids)

    def map_labels(self, labels: torch.Tensor) -> torch.Tensor:
        if self.label_map is None:
            return labels
        mapped = self.label_map[labels]
        if (mapped < 0).any():
            raise ValueError("a target token is outside the decoder vocabulary; build it from all training texts")
        return mapped


class TSDAELoss(nn.Module):
    """Denoising auto-encoder loss (TSDAE) over a SentenceTransformer, with a shared-layer decoder.

    The encoder embeds the noisy text to one vector (the model's own pooling and normalization); the decoder
    reconstructs the original text token by token from it. The cross-entropy is computed only at real
    (non-padding) target positions and in chunks of `chunk_tokens`, each recomputed in backward, so the
    batch x length x vocabulary logits (gigabytes for e5's 250k-token vocabulary) are never held at once.

    Args:
        model: the SentenceTransformer being adapted.
        vocab_ids: token ids the decoder predicts over (see `corpus_vocabulary`); None = whole vocabulary.
        chunk_tokens: target tokens per loss chunk.
        gradient_checkpointing: recompute decoder layers in backward.

    Inputs:
        (noisy text, original text) pairs; no labels.

    Reference:
        Wang, Reimers, Gurevych. TSDAE: Using Transformer-based Sequential Denoising Auto-Encoder for
        Unsupervised Sentence Embedding Learning. Findings of EMNLP 2021. https://arxiv.org/abs/2104.06979
    """

    def __init__(self, model: SentenceTransformer, vocab_ids: torch.Tensor | None = None, chunk_tokens: int = 512,
                 gradient_checkpointing: bool = False):
        super().__init__()
        self.model = model
        self.decoder = SharedLayerDecoder(model[0].auto_model, vocab_ids, gradient_checkpointing)
        self.decoder.to(model.device)
        self.chunk_tokens = chunk_tokens

    def _chunk_loss(self, hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        logits = self.decoder.transform(hidden) @ weight.T + self.decoder.bias
        return F.cross_entropy(logits.float(), labels, reduction="sum")

    def forward(self, sentence_features, labels=None) -> torch.Tensor:
        source, target = sentence_features
        sentence = self.model(source)["sentence_embedding"]
        input_ids, attention = target["input_ids"], target["attention_mask"]
        hidden = self.decoder(input_ids[:, :-1], attention[:, :-1], sentence)
        valid = attention[:, 1:].bool()
        hidden, targets = hidden[valid], self.decoder.map_labels(input_ids[:, 1:][valid])
        weight = self.decoder.output_weight().to(hidden.dtype)
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, len(targets), self.chunk_tokens):
            chunk = slice(start, start + self.chunk_tokens)
            total = total + checkpoint(self._chunk_loss, hidden[chunk], targets[chunk], weight, use_reentrant=False)
        return total / max(len(targets), 1)

    def get_config_dict(self) -> dict:
        vocab = self.decoder.vocab_ids
        return {"decoder": "shared-layer", "decoder_vocab": "full" if vocab is None else len(vocab),
                "chunk_tokens": self.chunk_tokens}

    @property
    def citation(self) -> str:
        return """@inproceedings{wang-2021-TSDAE,
    title = "TSDAE: Using Transformer-based Sequential Denoising Auto-Encoder for Unsupervised Sentence Embedding Learning",
    author = "Wang, Kexin and Reimers, Nils and Gurevych, Iryna",
    booktitle = "Findings of the Association for Computational Linguistics: EMNLP 2021",
    year = "2021",
    pages = "671--688",
}"""  # noqa: E501


def corpus_vocabulary(model: SentenceTransformer, texts: list[str]) -> torch.Tensor:
    """Sorted ids of every token the tokenizer produces on `texts`, plus the special tokens: all decoder
    targets lie in this set, so the softmax need not range over the rest of the vocabulary."""
    tokenizer = model.tokenizer
    ids = set(tokenizer.all_special_ids)
    for start in range(0, len(texts), 1000):
        encoded = tokenizer(texts[start : start + 1000], truncation=True, max_length=model.max_seq_length)
        for row in encoded["input_ids"]:
            ids.update(row)
    return torch.tensor(sorted(ids), dtype=torch.long)


# --------------------------------------------------------------------------------------------------------
# The objective


class DecoderWarmupCallback(TrainerCallback):
    """For the first `steps` optimizer steps only the decoder's new weights learn. Its cross-attention starts
    random, so the encoder's early gradients would chase a decoder that cannot yet read a sentence vector."""

    def __init__(self, encoder_params: list[torch.nn.Parameter], steps: int):
        self.encoder_params, self.steps = encoder_params, steps

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step < self.steps:
            for p in self.encoder_params:
                p.grad = None  # AdamW skips parameters without a gradient


def build(inputs: BuildInputs) -> Objective:
    train, model, data = inputs.train, inputs.model, inputs.data
    vocab = None
    if train.decoder_vocab == "corpus":
        vocab = corpus_vocabulary(model, data.texts + data.dev_texts)
        logger.info("decoder softmax over %d corpus tokens (of %d)", len(vocab), model[0].auto_model.config.vocab_size)
    loss = TSDAELoss(model, vocab, train.loss_chunk_tokens, train.gradient_checkpointing)
    words = WordNoise(inputs.noise, train.seed_for("train"))
    # fixed noise on the development texts: comparable losses from one evaluation to the next
    dev_noise = WordNoise(inputs.noise, train.seed_for("development"))
    dev = noisy_dataset(data.dev_texts, dev_noise) if data.dev_texts else None
    passage = inputs.prompts.get("passage")
    callbacks = []
    if train.decoder_warmup_steps:
        decoder_ids = {id(p) for p in loss.decoder.parameters()}
        encoder = [p for p in model.parameters() if p.requires_grad and id(p) not in decoder_ids]
        callbacks.append(DecoderWarmupCallback(encoder, train.decoder_warmup_steps))
    return Objective(noisy_dataset(data.texts, words), dev, loss, {"noisy": passage} if passage else {},
                     modules={"tsdae_decoder": loss.decoder}, callbacks=callbacks, epoch_aware=[words])


SPEC = ObjectiveSpec("tsdae", "denoising auto-encoder on single texts", build, in_batch_negatives=False)
