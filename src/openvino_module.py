"""A sentence-transformers input module that runs an exported encoder through OpenVINO (src/export.py writes it).

This file is copied into every exported folder as `modeling_openvino.py`, so that the folder loads without the kit:

    SentenceTransformer("runs/NAME/openvino", trust_remote_code=True)   # needs `pip install openvino`

It imports nothing from the kit. Why by hand: sentence-transformers' own `backend="openvino"` goes through
optimum-intel, which requires transformers < 5.6 (the kit pins 5.23); this module does what that backend does for an
encoder (tokenize, run the compiled model, hand the token embeddings to the Pooling module that follows it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sentence_transformers.base.modules import InputModule

MODEL_FILE = "openvino_model.xml"
MODULE_FILE = "modeling_openvino.py"  # this file's name in an exported folder


class OpenVINOEncoder(InputModule):
    """The transformer of a sentence-transformers model, as an OpenVINO model on the CPU.

    Args:
        folder: the exported folder (the OpenVINO model, its tokenizer).
        max_seq_length: tokens per text at most.
        precision_hint: OpenVINO's inference precision for what is not quantized ("" = OpenVINO's default: bf16
            where the CPU computes it natively, else fp32).
    """

    config_keys = ["max_seq_length", "precision_hint"]
    config_file_name = "openvino_config.json"
    save_in_root = True

    def __init__(self, folder: str, max_seq_length: int = 512, precision_hint: str = ""):
        import openvino as ov
        from transformers import AutoTokenizer

        super().__init__()
        self.folder, self.max_seq_length, self.precision_hint = str(folder), max_seq_length, precision_hint
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        options = {"INFERENCE_PRECISION_HINT": precision_hint} if precision_hint else {}
        self.compiled = ov.Core().compile_model(str(Path(self.folder) / MODEL_FILE), "CPU", options)
        self.inputs = {port.get_any_name() for port in self.compiled.inputs}
        # sentence-transformers reads a model's device and dtype from its parameters: one that never trains
        self.register_buffer("placeholder", torch.zeros(1), persistent=False)

    def preprocess(self, inputs, prompt: str | None = None, **kwargs) -> dict:
        texts = self._prepend_prompt(list(inputs), prompt) if prompt else list(inputs)
        return dict(self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_seq_length,
                                   return_tensors="pt"))

    def forward(self, features: dict, **kwargs) -> dict:
        feeds = {name: features[name].cpu().numpy().astype(np.int64) for name in self.inputs}
        hidden = self.compiled(feeds)[0]
        # on the device of the tensors around it: in a Router, the other route may sit on a GPU
        features["token_embeddings"] = torch.from_numpy(np.asarray(hidden, dtype=np.float32)).to(
            features["attention_mask"].device)
        return features

    def get_embedding_dimension(self) -> int:
        return int(self.compiled.outputs[0].get_partial_shape()[2].get_length())

    def save(self, output_path: str, *args, **kwargs) -> None:
        import shutil

        for path in Path(self.folder).iterdir():
            if path.is_file() and not (Path(output_path) / path.name).exists():
                shutil.copy2(path, Path(output_path) / path.name)
        self.save_config(output_path)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", **kwargs) -> "OpenVINOEncoder":
        folder = Path(model_name_or_path) / subfolder
        return cls(str(folder), **cls.load_config(str(folder)))
