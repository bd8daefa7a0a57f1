"""Export an adapted model for serving on CPUs: OpenVINO, int8 weights and activations.

    python -m src.export --model runs/e5-small-ru/merged --calibration_file data/ru_catalog/train.jsonl \
        --output_dir runs/e5-small-ru/openvino
    # or as part of a run: python -m src.trainer ... --export openvino

The transformer is converted by `openvino.convert_model` and quantized by NNCF's post-training static quantization
(`nncf.quantize`, transformer preset: activations and weights int8, smooth-quant and bias correction), calibrated
on the domain's own training texts with the prompt of the side it exports (documents, or a query-side run's
queries), not on a generic English set: int8 ranges set on other text cost retrieval quality on this one. The
exported folder is a sentence-transformers model whose first module is src/openvino_module.py (copied in as
`modeling_openvino.py`), followed by the model's own pooling and normalization; it loads with
`SentenceTransformer(folder, trust_remote_code=True)` wherever openvino is installed. Saving a loaded export again
with sentence-transformers is not supported (a Router would record the module's import path on this machine).

A query-side run's merged/ (`--adapt queries`: a Router of the adapted query encoder and the untouched base) keeps
its shape: only the query route's transformer becomes int8 OpenVINO, calibrated on the run's queries with the query
prompt; the document route stays the base's PyTorch modules, so `encode_document` still gives exactly the
embeddings of the index the user keeps, and `encode_query` runs at int8 speed.

Why not sentence-transformers' `export_static_quantized_openvino_model`: it goes through optimum-intel, which requires
transformers < 5.6 (the kit pins 5.23). The evaluation (src/evaluation.py) scores the export beside the PyTorch model.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from src.cli import parse_groups
from src.encoding import load_model
from src.errors import KitError, UsageError, run_cli
from src.openvino_module import MODEL_FILE, MODULE_FILE
from src.settings import Settings, help_field
from src.tables import read_table

logger = logging.getLogger(__name__)

PACKAGES = ("openvino", "nncf")  # what an export needs (requirements.txt)
# NNCF's default calibration subset: enough texts for stable activation ranges, a minute of CPU on e5-small.
CALIBRATION_TEXTS = 300
MODULE_TYPE = "modeling_openvino.OpenVINOEncoder"
ROUTER_CONFIG = "router_config.json"  # sentence-transformers' Router: its modules' types and routes


def check_export_packages() -> None:
    """A missing package is a one-line error naming what to install, before any work."""
    missing = [name for name in PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f"option --export openvino: needs the packages {', '.join(missing)} "
                         f"(pip install -r requirements.txt)")


def check_export(export: str) -> None:
    """`--export` as a run will do it, checked before the run starts."""
    if export:
        check_export_packages()


def calibration_sample(texts: list[str], count: int = CALIBRATION_TEXTS, seed: int = 0) -> list[str]:
    """A seeded sample of at most `count` training texts, in file order."""
    if len(texts) <= count:
        return list(texts)
    return [texts[i] for i in np.sort(np.random.default_rng(seed).choice(len(texts), count, replace=False))]


def hidden_states(model):
    """The model's transformer as a module of (input_ids, attention_mask) -> last hidden state, for the converter."""
    import torch

    class HiddenStates(torch.nn.Module):
        def __init__(self, transformer):
            super().__init__()
            self.transformer = transformer

        def forward(self, input_ids, attention_mask):
            return self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    return HiddenStates(model[0].auto_model.eval())


def token_features(model, texts: list[str]) -> dict:
    """The converted model's inputs for `texts` (padded to the longest, cut at the model's length), as int64 arrays."""
    tokens = model.tokenizer(texts, padding=True, truncation=True, max_length=model.max_seq_length,
                             return_tensors="np")
    return {name: tokens[name].astype(np.int64) for name in ("input_ids", "attention_mask")}


def quantized_model(model, texts: list[str], prompt_name: str):
    """The OpenVINO model of `model`'s transformer, int8 as calibrated on `texts` with the prompt `prompt_name`
    (the texts the exported encoder will see: documents, or a query route's queries)."""
    import nncf
    import openvino as ov
    import torch

    prompt = (model.prompts or {}).get(prompt_name, "")

    def features(batch: list[str]) -> dict:
        return token_features(model, [prompt + t for t in batch])

    example = {name: torch.from_numpy(value) for name, value in features(texts[:2]).items()}
    with torch.no_grad():
        converted = ov.convert_model(hidden_states(model), example_input=example)
    calibration = nncf.Dataset([features([t]) for t in texts])
    return nncf.quantize(converted, calibration, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(texts))


def write_encoder(model, quantized, folder: Path) -> None:
    """The OpenVINOEncoder module's files in `folder`: the OpenVINO model, the tokenizer, the module's settings."""
    import openvino as ov

    ov.save_model(quantized, str(folder / MODEL_FILE), compress_to_fp16=False)
    model.tokenizer.save_pretrained(str(folder))
    (folder / "openvino_config.json").write_text(
        json.dumps({"max_seq_length": model.max_seq_length, "precision_hint": ""}) + "\n", encoding="utf-8")


def write_folder(model, source: Path, quantized, folder: Path) -> None:
    """The sentence-transformers folder: the OpenVINO encoder, and the source model's own later modules (pooling,
    normalization) and prompts."""
    write_encoder(model, quantized, folder)
    modules = json.loads((source / "modules.json").read_text(encoding="utf-8"))
    for module in modules[1:]:
        shutil.copytree(source / module["path"], folder / module["path"])
    modules[0] = {**modules[0], "path": "", "type": MODULE_TYPE}
    (folder / "modules.json").write_text(json.dumps(modules, indent=2) + "\n", encoding="utf-8")
    # the prompts as the kit loads them: e5's `passage: ` for encode_document too (src/provision.py)
    settings = json.loads((source / "config_sentence_transformers.json").read_text(encoding="utf-8"))
    settings["prompts"] = dict(model.prompts)
    (folder / "config_sentence_transformers.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")


def query_route(model, source: Path):
    """A query-side run's query encoder (the query route of its Router) as a sentence-transformers model with the
    run's prompts; None for a model of one encoder."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Router

    if not isinstance(model[0], Router):
        return None
    routes = model[0].sub_modules  # a ModuleDict
    route = list(routes["query"]) if "query" in routes else []
    if not route or not hasattr(route[0], "auto_model"):
        raise KitError(f"model {source}: a Router without a query route that starts with a transformer; only a "
                       f"--adapt queries run's merged/ (query and document routes) can be exported")
    return SentenceTransformer(modules=route, prompts=dict(model.prompts), device="cpu")


def write_router_folder(encoder, source: Path, quantized, folder: Path) -> None:
    """A copy of the Router in `source` whose query route starts with the OpenVINO encoder: the document route (the
    base, as the user's index holds it), the pooling, the normalization and the prompts are the source's own."""
    config = json.loads((source / ROUTER_CONFIG).read_text(encoding="utf-8"))
    first = config["structure"]["query"][0]
    shutil.copytree(source, folder, dirs_exist_ok=True, ignore=lambda d, _: [first] if Path(d) == source else [])
    (folder / first).mkdir()
    write_encoder(encoder, quantized, folder / first)
    config["types"][first] = MODULE_TYPE
    (folder / ROUTER_CONFIG).write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")


def export_openvino(source: Path, folder: Path, texts: list[str]) -> Path:
    """Export the sentence-transformers model in `source` (a run's merged/) to `folder`, int8, calibrated on a sample
    of `texts`. Built in `<folder>.tmp` and renamed into place: a failed export leaves nothing that looks done."""
    check_export_packages()
    if not texts:
        raise KitError(f"export of {source}: no texts to calibrate int8 on")
    model = load_model(str(source), device="cpu")
    encoder = query_route(model, source)
    if encoder is None and not hasattr(model[0], "auto_model"):
        raise KitError(f"model {source}: its first module is neither a transformer nor a query/document Router")
    sample = calibration_sample(texts)
    logger.info("export: OpenVINO int8%s, calibrated on %d training texts",
                "" if encoder is None else " (the query route)", len(sample))
    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    if encoder is None:
        write_folder(model, source, quantized_model(model, sample, "passage"), staging)
    else:
        write_router_folder(encoder, source, quantized_model(encoder, sample, "query"), staging)
    # the module's code at the folder's root, where sentence-transformers looks for `modeling_openvino`
    shutil.copy2(Path(__file__).with_name("openvino_module.py"), staging / MODULE_FILE)
    staging.rename(folder)
    return folder


@dataclass
class ExportArguments(Settings):
    """Settings of `python -m src.export`."""

    model: str = help_field("The sentence-transformers model folder to export (a run's merged/).", default="")
    calibration_file: str = help_field("Training texts to calibrate int8 on (any format the trainer reads; its "
                                       "--text_column).", default="")
    text_column: str = help_field("Column of the calibration file holding the texts (for a --adapt queries run's "
                                  "merged/, the queries' column, e.g. title).", default="text")
    output_dir: str = help_field("Folder to write (must not exist).", default="")

    def validate(self):
        for option in ("model", "calibration_file", "output_dir"):
            if not getattr(self, option):
                raise UsageError(f"option --{option}: required")


def main(argv=None) -> None:
    args = parse_groups({"export": ExportArguments}, argv)["export"]
    folder = Path(args.output_dir)
    if folder.exists():
        raise KitError(f"{folder} already exists; choose another --output_dir")
    frame = read_table(args.calibration_file, args.text_column)
    if args.text_column not in frame.columns:
        raise KitError(f"{args.calibration_file}: missing column '{args.text_column}' (--text_column)")
    texts = [str(t) for t in frame[args.text_column] if str(t).strip()]
    print(f"wrote {export_openvino(Path(args.model), folder, texts)}")


if __name__ == "__main__":
    run_cli(main)
