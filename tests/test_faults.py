"""What happens when things go wrong during training: a crash, a signal, a non-finite loss, running out of
memory. Each test fails if the run loses work or claims to be finished when it is not."""

import json
import os
import signal

import pytest
import torch
from conftest import run_config
from safetensors.torch import load_file
from transformers import TrainerCallback

from src import trainer as trainer_module
from src.errors import KitError
from src.objectives.tsdae import TSDAELoss


def with_callback(monkeypatch, callback):
    original = trainer_module.KitTrainer.__init__

    def init(self, *args, **kwargs):
        kwargs["callbacks"] = kwargs["callbacks"] + [callback]
        original(self, *args, **kwargs)

    monkeypatch.setattr(trainer_module.KitTrainer, "__init__", init)


def assert_same_adapter(a, b):
    a = load_file(str(a / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(b / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    assert float(max(v.abs().max() for k, v in a.items() if "lora_B" in k)) > 0  # it did train


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_bert):
    return trainer_module.train(run_config(tmp_path_factory.mktemp("whole"), tiny_bert, "whole", max_steps=6,
                                           save_steps=3))


def test_crash_then_resume_skips_a_torn_checkpoint_and_reaches_the_same_weights(tmp_path, tiny_bert, uninterrupted,
                                                                                 monkeypatch):
    class Crash(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            raise KeyboardInterrupt  # dies right after writing checkpoint-3, like kill -9 would

    with monkeypatch.context() as m:
        with_callback(m, Crash())
        with pytest.raises(KeyboardInterrupt):
            trainer_module.train(run_config(tmp_path, tiny_bert, "broken", max_steps=6, save_steps=3))
    assert (tmp_path / "broken.partial" / "checkpoints" / "checkpoint-3").is_dir()
    assert not (tmp_path / "broken").exists()  # nothing looks finished
    torn = tmp_path / "broken.partial" / "checkpoints" / "checkpoint-5"  # killed while writing a checkpoint
    torn.mkdir()
    (torn / "trainer_state.json").write_text("{")
    resumed = trainer_module.train(run_config(tmp_path, tiny_bert, "broken", max_steps=6, save_steps=3, resume=True))
    assert_same_adapter(uninterrupted, resumed)


def test_a_resumed_run_reports_every_development_evaluation_once(tmp_path, tiny_bert, monkeypatch):
    class Crash(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            raise KeyboardInterrupt  # after the evaluations of steps 0 and 2, with checkpoint-3 written

    def config(**more):
        cfg = run_config(tmp_path, tiny_bert, "selected", max_steps=6, save_steps=3, eval_steps=2, select_best=True,
                         dev_distractors=20, **more)
        cfg.data.max_train_texts = 120  # enough held-out items for model selection
        return cfg

    with monkeypatch.context() as m:
        with_callback(m, Crash())
        with pytest.raises(KeyboardInterrupt):
            trainer_module.train(config())
    run = json.loads((trainer_module.train(config(resume=True)) / "run.json").read_text())
    assert [step for step, _ in run["dev_ndcg@10_by_step"]] == [0, 2, 4, 6]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_writes_a_checkpoint_and_resume_finishes_the_same(tmp_path, tiny_bert, uninterrupted, monkeypatch, sig):
    class Interrupt(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:  # during step 2
                os.kill(os.getpid(), sig)

    before = signal.getsignal(sig)
    with monkeypatch.context() as m:
        with_callback(m, Interrupt())
        with pytest.raises(KitError, match=f"stopped by {sig.name} at step 2.*--resume"):
            trainer_module.train(run_config(tmp_path, tiny_bert, "stopped", max_steps=6, save_steps=3))
    assert (tmp_path / "stopped.partial" / "checkpoints" / "checkpoint-2").is_dir()  # not a save_steps multiple
    assert signal.getsignal(sig) is before  # handlers restored
    resumed = trainer_module.train(run_config(tmp_path, tiny_bert, "stopped", max_steps=6, save_steps=3, resume=True))
    assert_same_adapter(uninterrupted, resumed)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_bert, monkeypatch):
    original, calls = TSDAELoss.forward, []

    def poisoned(self, *args, **kwargs):
        calls.append(1)
        value = original(self, *args, **kwargs)
        return value * float("nan") if len(calls) == 4 else value

    monkeypatch.setattr(TSDAELoss, "forward", poisoned)
    with pytest.raises(KitError, match="loss became nan at step 4.*up to step 3"):
        trainer_module.train(run_config(tmp_path, tiny_bert, "nan", max_steps=6, save_steps=3))
    checkpoint = tmp_path / "nan.partial" / "checkpoints" / "checkpoint-3"
    state = load_file(str(checkpoint / trainer_module.TRAINABLE_FILE))
    assert all(torch.isfinite(v).all() for v in state.values())
    assert not (tmp_path / "nan").exists()


def test_out_of_memory_gives_advice(tmp_path, tiny_bert, monkeypatch):
    def oom(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer_module.KitTrainer, "train", oom)
    with pytest.raises(KitError, match="out of memory at batch size 4: continue with --resume and --checkpoint_every "
                                       "1.*smaller --batch_size.*--precision nf4"):
        trainer_module.train(run_config(tmp_path, tiny_bert, "oom", max_steps=6))
    assert not (tmp_path / "oom").exists()
