"""Faults of a real machine: a full disk at each writer, two processes on one run folder, a stale lock, two cache
writers, a cache that cannot be written. Each test asserts one error line (or a warning and a finished run), and a
run folder that stays intact and resumable."""

import errno
import json
import os
import socket
import subprocess
import threading

import numpy as np
import pytest
from conftest import RU_TRAIN, run_config
from test_faults import assert_same_adapter

from src import trainer as trainer_module
from src.errors import KitError, is_disk_full, run_cli
from src.run_folder import prepare_run_folder
from src.run_lock import LOCK_FILE


def safetensors_full() -> Exception:
    """What safetensors raises on a full disk: a bare Exception. A new one each time: a raised exception keeps its
    traceback, and a module-level one would keep the failed run's trainer alive for every later test."""
    return Exception("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left "
                     "on device\" }) (os error 28)")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_bert):
    return trainer_module.train(run_config(tmp_path_factory.mktemp("whole"), tiny_bert, "whole", max_steps=6,
                                           save_steps=3))


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_the_libraries_full_disk_errors_are_recognised_and_others_are_not():
    assert is_disk_full(safetensors_full()) and is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    try:
        try:
            raise safetensors_full()
        except Exception as inner:
            raise RuntimeError("saving failed") from inner
    except RuntimeError as outer:
        assert is_disk_full(outer)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied")) and not is_disk_full(ValueError("28"))


@pytest.mark.parametrize("where, patched, what", [
    ("checkpoint", "src.callbacks.save_trainable_state", "a checkpoint"),
    ("models", "src.trainer.save_models", r"the training log, the models \(adapter/, merged/\)"),
])
def test_a_full_disk_is_one_error_line_and_the_run_resumes_to_the_same_adapter(tmp_path, tiny_bert, uninterrupted,
                                                                                monkeypatch, where, patched, what):
    def no_space(*args, **kwargs):
        raise safetensors_full() if where == "models" else OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(patched, no_space)
        with pytest.raises(KitError, match=f"no space left on the device writing {what} to .*MB free.*--resume"):
            trainer_module.train(run_config(tmp_path, tiny_bert, "full", max_steps=6, save_steps=3))
    partial = tmp_path / "full.partial"
    assert (partial / "config.json").is_file() and not (partial / LOCK_FILE).exists()  # intact, unlocked
    assert not (tmp_path / "full").exists()  # nothing looks finished
    resumed = trainer_module.train(run_config(tmp_path, tiny_bert, "full", max_steps=6, save_steps=3, resume=True))
    assert_same_adapter(uninterrupted, resumed)


def test_a_disk_too_small_for_the_run_is_refused_before_training_in_one_line(tmp_path, tiny_bert, monkeypatch,
                                                                            capsys):
    monkeypatch.setattr("src.run_folder.free_bytes", lambda path: 10**6)
    argv = ["--model_name_or_path", str(tiny_bert), "--objective", "tsdae", "--train_file", str(RU_TRAIN),
            "--max_train_texts", "48", "--max_steps", "2", "--eval_data", "", "--output_dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as exit_:
        run_cli(trainer_module.main, argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 1 and len(lines) == 1
    assert lines[0].startswith("error: not enough space for this run in ") and "MB needed" in lines[0]
    assert not (tmp_path / "run.partial").exists()  # refused before any step, nothing left behind


def lock_of(pid: int) -> str:
    return json.dumps({"pid": pid, "host": socket.gethostname(), "started": "2026-12-05 08:00:00"})


@pytest.mark.parametrize("option", ["resume", "overwrite"])
def test_a_second_process_on_a_running_run_is_refused_at_once(tmp_path, tiny_bert, option):
    cfg = run_config(tmp_path, tiny_bert, "busy", **({"resume": True} if option == "resume" else {}))
    if option == "overwrite":
        cfg.output.overwrite = True
    partial = tmp_path / "busy.partial"
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    first = subprocess.Popen(["sleep", "60"])
    try:
        (partial / LOCK_FILE).write_text(lock_of(first.pid))
        with pytest.raises(KitError, match=f"run folder .*busy.partial is in use by process {first.pid} on "):
            prepare_run_folder(cfg)
    finally:
        first.kill()
        first.wait()
    assert (partial / "config.json").exists()  # --overwrite deleted nothing


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, tiny_bert, caplog):
    gone = subprocess.Popen(["true"])
    gone.wait()
    partial = tmp_path / "stale.partial"
    partial.mkdir()
    (partial / LOCK_FILE).write_text(lock_of(gone.pid))
    folder = prepare_run_folder(run_config(tmp_path, tiny_bert, "stale", resume=True))
    assert json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"its process {gone.pid} on {socket.gethostname()}" in caplog.text and "is gone" in caplog.text


def stored_cache(tiny_bert, root):
    from src.embedding_cache import EmbeddingCache
    from src.encoding import load_model

    return EmbeddingCache(load_model(str(tiny_bert), device="cpu"), tiny_bert, 16, False, root)


def test_two_writers_of_one_cache_entry_leave_one_valid_entry(tmp_path, tiny_bert):
    texts = [f"text number {i}" for i in range(50)]
    arrays = [np.random.default_rng(seed).normal(size=(50, 32)).astype(np.float32) for seed in (1, 2)]
    caches = [stored_cache(tiny_bert, tmp_path / "cache") for _ in arrays]
    for _ in range(5):  # both store the same key at once, again and again
        writers = [threading.Thread(target=c.store, args=(texts, None, a)) for c, a in zip(caches, arrays)]
        for w in writers:
            w.start()
        for w in writers:
            w.join()
        read = caches[0].load(texts, None)
        assert read is not None and any(np.array_equal(read, a) for a in arrays)  # one writer's, whole
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1 and not list((tmp_path / "cache").glob("*.tmp-*"))


def test_a_cache_that_cannot_be_written_is_a_warning_and_a_full_one_too(tmp_path, tiny_bert, caplog, monkeypatch):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    texts, emb = ["one text", "another"], np.ones((2, 32), dtype=np.float32)
    stored_cache(tiny_bert, blocked / "embeddings").store(texts, None, emb)  # the folder cannot be made
    assert "embedding cache: cannot write" in caplog.text
    caplog.clear()
    monkeypatch.setattr("src.embedding_cache.write_atomic", full_disk)
    cache = stored_cache(tiny_bert, tmp_path / "cache")
    cache.store(texts, None, emb)
    assert "No space left on device" in caplog.text and cache.load(texts, None) is None
