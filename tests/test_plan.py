"""The run's plan (src/plan.py) resolves every setting that means "decide for me", once; later code reads the plan."""

import dataclasses
import typing

from src.config import GROUPS, Config, DataConfig, ModelConfig, TrainConfig
from src.plan import RunPlan, plan_run

# Every setting whose default leaves the choice to the kit (`auto`, or 0 = auto), and the RunPlan field holding the
# choice.
RESOLVED_BY_THE_PLAN = {
    ("train", "objective"): "objective", ("train", "learning_rate"): "learning_rate",
    ("train", "mnrl_scale"): "mnrl_scale", ("train", "epochs"): "epochs", ("train", "eval_steps"): "eval_steps",
    ("train", "lora_scales"): "lora_scales", ("train", "dev_construction"): "dev_construction",
    ("train", "bf16"): "bf16", ("train", "device"): "device", ("model", "precision"): "precision",
    ("model", "max_seq_length"): "max_seq_length", ("train", "adapt"): "adapt",
}
# ... and those that are not a training run's: the evaluation's own (src/evaluation.py runs alone too), and the
# LoRA targets, which are the loaded model's module names.
RESOLVED_ELSEWHERE = {("eval", "eval_bf16"), ("model", "lora_target_modules")}


def auto_settings() -> set:
    found = set()
    for group, settings in GROUPS.items():
        for f in dataclasses.fields(settings):
            choices = typing.get_args(f.type) if not isinstance(f.type, str) else ()
            if f.default == "auto" or "auto" in choices or "0 = auto" in f.metadata.get("help", ""):
                found.add((group, f.name))
    return found


def test_every_auto_setting_is_resolved_by_the_plan_or_named_as_not_a_runs():
    assert auto_settings() == set(RESOLVED_BY_THE_PLAN) | RESOLVED_ELSEWHERE
    assert set(RESOLVED_BY_THE_PLAN.values()) <= {f.name for f in dataclasses.fields(RunPlan)}


def test_the_plan_leaves_no_auto_value(tiny_bert):
    for columns in (["title", "description", "text"], ["_id", "text"]):
        cfg = Config(data=DataConfig(train_file="t.jsonl"), model=ModelConfig(model_name_or_path=str(tiny_bert)),
                     train=TrainConfig())
        plan = plan_run(cfg, columns).with_budget(500, cfg.train).with_hardware(cfg.model, cfg.train, "cpu")
        values = {name: getattr(plan, name) for name in RESOLVED_BY_THE_PLAN.values()}
        assert "auto" not in values.values() and values["precision"] in ("nf4", "none", "full")
        assert all(values[n] > 0 for n in ("learning_rate", "mnrl_scale", "epochs", "max_seq_length"))
        assert values["device"] == "cpu" and isinstance(values["bf16"], bool)
        assert values["eval_steps"] > 0 or plan.documents_recipe  # the documents recipe never evaluates


def test_the_plan_turns_checkpointing_off_where_backward_stops_above_half_the_layers(tiny_bert):
    """--lora_layers 1 of tiny_bert's 2: backward stops at the top layer, so nothing is worth recomputing."""
    for lora_layers, checkpointing, expected in ((0, True, 2), (1, True, 0), (0, False, 0)):
        cfg = Config(data=DataConfig(train_file="t.jsonl"),
                     model=ModelConfig(model_name_or_path=str(tiny_bert), lora_layers=lora_layers),
                     train=TrainConfig(gradient_checkpointing=checkpointing))
        plan = plan_run(cfg, ["_id", "text"]).with_hardware(cfg.model, cfg.train, "cpu")
        assert plan.checkpoint_every == expected
