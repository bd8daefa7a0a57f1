"""Untrusted model folders and impossible requests: nothing runs that should not, and each refusal is one line
naming the path or option."""

import json
import shutil

import pytest
import torch

from src.config import ModelConfig
from src.errors import KitError
from src.model_builder import build_model, pick_device


def copy_model(src, dst):
    shutil.copytree(src / "hf", dst)
    return dst


def test_pickle_weights_need_an_explicit_flag(tmp_path, tiny_bert):
    folder = copy_model(tiny_bert.parent, tmp_path / "pickled")
    from safetensors.torch import load_file

    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(KitError, match=f"model {folder} has only pickle-based weights.*--allow_pickle"):
        build_model(ModelConfig(model_name_or_path=str(folder)))
    model = build_model(ModelConfig(model_name_or_path=str(folder), precision="none", allow_pickle=True))
    assert any(p.requires_grad for p in model.parameters())


def test_remote_code_and_non_encoders_are_refused(tmp_path, tiny_bert):
    folder = copy_model(tiny_bert.parent, tmp_path / "custom")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="my_custom_model", auto_map={"AutoModel": "modeling_custom.CustomModel"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_custom.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(KitError, match="model_type 'my_custom_model' is not a supported encoder"):
        build_model(ModelConfig(model_name_or_path=str(folder), trust_remote_code=False))


def test_missing_model_folder_is_one_line(tmp_path):
    with pytest.raises(KitError) as err:
        build_model(ModelConfig(model_name_or_path=str(tmp_path / "nowhere")))
    assert "nowhere" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_requested_where_there_is_none():
    with pytest.raises(KitError, match="option --device cuda: no CUDA GPU"):
        pick_device("cuda")
