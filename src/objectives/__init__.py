"""Training objectives: one file each, declaring an `ObjectiveSpec` (src/objectives/base.py): its name, what it
trains on, the levers that act on it, its defaults, and its builder, which turns the training data into datasets
and a loss for the sentence-transformers trainer.

    mnrl.py            (query, document) pairs the file holds (--pair_columns)
    from_documents.py  lead, ict, crop, keys: pairs made from documents alone
    simcse.py          each text twice, two dropout masks
    tsdae.py           denoising auto-encoder on single texts

An objective is one of them or several joined by '+' (`tsdae+lead`): batches are then drawn from each part's data
in proportion (the trainer's multi-dataset mode). A new objective is a new file here whose spec `register` adds:
config, plan and trainer read the registry, never a name. What `auto` resolves to is src/plan.py's decision; model
selection, on development pairs, is src/selection.py.
"""

from __future__ import annotations

from src.errors import UsageError
from src.objectives import from_documents, mnrl, simcse, tsdae
from src.objectives.base import BuildInputs, Objective, ObjectiveSpec, examples_per_step

OBJECTIVES: dict[str, ObjectiveSpec] = {}


def register(spec: ObjectiveSpec) -> ObjectiveSpec:
    """Make `spec` an `--objective` name (one file's whole contribution)."""
    if spec.name in OBJECTIVES or spec.name == "auto" or not spec.name.isidentifier():
        raise ValueError(f"objective name '{spec.name}': taken, reserved, or not a plain word")
    OBJECTIVES[spec.name] = spec
    return spec


for _spec in (mnrl.SPEC, *from_documents.SPECS, simcse.SPEC, tsdae.SPEC):
    register(_spec)


def parts(objective: str) -> list[str]:
    return objective.split("+")


def check_objective(objective: str) -> None:
    """An --objective that is not distinct registered names joined by '+' is a one-line error."""
    names = parts(objective)
    if any(n not in OBJECTIVES for n in names) or len(set(names)) != len(names):
        raise UsageError(f"option --objective {objective}: must be auto or distinct parts of "
                         f"{', '.join(OBJECTIVES)} joined by '+'")


def specs(objective: str) -> list[ObjectiveSpec]:
    return [OBJECTIVES[p] for p in parts(objective)]


def alone(objective: str) -> ObjectiveSpec | None:
    """The spec of a single-part objective (whose defaults apply); None for several parts (the shared defaults)."""
    found = specs(objective)
    return found[0] if len(found) == 1 else None


def needs_pairs(objective: str) -> bool:
    return any(s.needs_pairs for s in specs(objective))


def needs_texts(objective: str) -> bool:
    return any(not s.needs_pairs for s in specs(objective))


def uses_in_batch_negatives(objective: str) -> bool:
    return any(s.in_batch_negatives for s in specs(objective))


def build_objective(objective: str, inputs: BuildInputs) -> Objective:
    """Each part of `objective` built; several parts become one Objective of dicts keyed by part (the trainer's
    multi-dataset mode draws each batch from one part, in proportion to their sizes)."""
    built = {s.name: s.build(inputs) for s in specs(objective)}
    if len(built) == 1:
        return next(iter(built.values()))
    dev = {p: b.eval_dataset for p, b in built.items() if b.eval_dataset is not None} or None
    return Objective({p: b.train_dataset for p, b in built.items()}, dev, {p: b.loss for p, b in built.items()},
                     {p: b.prompts for p, b in built.items()},
                     {name: m for b in built.values() for name, m in b.modules.items()},
                     [c for b in built.values() for c in b.callbacks],
                     [item for b in built.values() for item in b.epoch_aware])


__all__ = ["OBJECTIVES", "BuildInputs", "Objective", "ObjectiveSpec", "alone", "build_objective", "check_objective",
           "examples_per_step", "needs_pairs", "needs_texts", "parts", "register", "specs",
           "uses_in_batch_negatives"]
