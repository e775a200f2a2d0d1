"""The training recipe's planning rules (batch, positive share, epochs) and the planners' presets: pure functions
of the fingerprint, unit-tested on hand-made ones (tests/test_planning.py)."""
from __future__ import annotations

import math

from lnm_auto.plans.network_topology import CPU_BUDGET, GPU_BUDGET, ComputeBudget
from lnm_auto.plans.plans import TrainingRecipe
from lnm_auto.utils.errors import LNMError

# Oversampling: at least a third of each batch positive (like nnU-Net's 33% foreground oversampling).
MIN_POSITIVE_FRACTION = 0.33
MAX_POSITIVE_FRACTION = 0.5
MIN_STEPS_PER_EPOCH = 4


# Per planner: the compute budget that sizes the networks, and the recipe's batch / lr / epoch rule.
# Epochs (documentation/planning.md, "Epochs"): ``training_steps`` optimizer steps, spread over as many epochs
# (passes over a fold's labelled training nodes) as that takes, kept within ``epochs`` (min, max). nnU-Net keeps
# one count for all; here a fold of 70 labelled nodes (5 steps an epoch) and one of 3000 (190) would otherwise
# get 40x different training. GPU: the paper's 300 epochs (no GPU measurement yet says otherwise). CPU: a
# network from scratch gets 250 steps (the 50 epochs the 40-case phantom had before the rule); an ImageNet-
# pretrained backbone half (PRETRAINED_STEP_FACTOR): on that phantom the same test AUROC with 25 epochs as with 50
# (benchmarks/README.md, "The user's wait").
PLANNERS = {
    "LNMPlanner": (GPU_BUDGET, {"batch_size": 32, "initial_lr": 1e-2, "training_steps": 3000, "epochs": (300, 300),
                                "semi_supervised_fraction": 1.0}),
    "LNMPlannerCPU": (CPU_BUDGET, {"batch_size": 16, "initial_lr": 1e-2, "training_steps": 250, "epochs": (10, 50),
                                   "semi_supervised_fraction": 0.2}),
}
PRETRAINED_STEP_FACTOR = 0.5
# The semi-supervised stage (PGLS, mean teacher) continues a trained model: ``semi_supervised_fraction`` of its
# epochs, at least MIN_SEMI_SUPERVISED_EPOCHS (CPU: over 50 such epochs on the 40-case phantom the mean validation
# AUROC fell, 0.727 -> 0.676; GPU: the paper's full length).
MIN_SEMI_SUPERVISED_EPOCHS = 5


def budget_for_planner(planner: str) -> ComputeBudget:
    """The compute budget a planner sizes networks to."""
    return _planner(planner)[0]


def _planner(planner: str):
    if planner not in PLANNERS:
        raise LNMError(f"unknown planner '{planner}': use one of {', '.join(PLANNERS)}")
    return PLANNERS[planner]


def labelled_node_counts(fingerprint: dict) -> tuple[int, int]:
    """Number of positive and of negative nodes in the fingerprint."""
    labels = [n["label"] for n in fingerprint["nodes"]]
    return sum(1 for v in labels if v == 1), sum(1 for v in labels if v == 0)


def per_fold_training_nodes(n_nodes: int, n_folds: int) -> float:
    """The nodes one fold trains on: all but its validation share."""
    return n_nodes * (n_folds - 1) / max(n_folds, 1)


def plan_batch_size(n_labelled_nodes: int, n_folds: int, preferred: int) -> int:
    """The planner's batch, capped so one epoch of a fold's training nodes has several steps."""
    cap = int(per_fold_training_nodes(n_labelled_nodes, n_folds) // MIN_STEPS_PER_EPOCH)
    return int(max(2, min(preferred, cap)))


def plan_positive_fraction(n_pos: int, n_neg: int) -> float:
    """Minimum share of positive nodes per training batch: the prevalence, clipped to the planned range."""
    prevalence = n_pos / max(n_pos + n_neg, 1)
    return float(min(MAX_POSITIVE_FRACTION, max(MIN_POSITIVE_FRACTION, prevalence)))


def plan_num_epochs(n_training_nodes: int, n_folds: int, batch_size: int, training_steps: int,
                    epoch_range: tuple[int, int]) -> int:
    """Epochs giving ``training_steps`` optimizer steps over a fold's training nodes (one epoch: one pass, in
    ceil(nodes / batch) steps), within ``epoch_range``."""
    steps_per_epoch = max(1, math.ceil(per_fold_training_nodes(n_training_nodes, n_folds) / max(batch_size, 1)))
    low, high = epoch_range
    return int(min(high, max(low, math.ceil(training_steps / steps_per_epoch))))


def plan_semi_supervised_epochs(num_epochs: int, fraction: float) -> int:
    """Epochs of the stage that continues a supervised model: a share of its epochs, at least a few (never more
    than the supervised stage's)."""
    return int(min(num_epochs, max(MIN_SEMI_SUPERVISED_EPOCHS, math.ceil(fraction * num_epochs))))


def training_node_count(fingerprint: dict) -> int:
    """Nodes the supervised trainer learns from: the node-labelled ones (every node when none has a node label:
    the weak trainers learn from station / patient labels)."""
    n_pos, n_neg = labelled_node_counts(fingerprint)
    return n_pos + n_neg if n_pos + n_neg else len(fingerprint["nodes"])


def plan_recipe(fingerprint: dict, n_folds: int, planner: str, step_factor: float = 1.0) -> TrainingRecipe:
    """Batch size, positive share, epochs (the planner's steps x ``step_factor``) and optimiser settings."""
    preset = _planner(planner)[1]
    n_pos, n_neg = labelled_node_counts(fingerprint)
    n_training_nodes = training_node_count(fingerprint)
    batch_size = plan_batch_size(n_training_nodes, n_folds, preset["batch_size"])
    num_epochs = plan_num_epochs(n_training_nodes, n_folds, batch_size,
                                 round(preset["training_steps"] * step_factor), preset["epochs"])
    return TrainingRecipe(
        batch_size=batch_size,
        positive_fraction=plan_positive_fraction(n_pos, n_neg),
        num_epochs=num_epochs,
        initial_lr=preset["initial_lr"],
        momentum=0.9,
        weight_decay=3e-5,
        # None when it equals num_epochs (GPU): not written, so such plans stay the file they were before the field
        semi_supervised_epochs=semi if (semi := plan_semi_supervised_epochs(
            num_epochs, preset["semi_supervised_fraction"])) != num_epochs else None,
    )


def describe_epoch_rule(fingerprint: dict, n_folds: int, planner: str, recipe: TrainingRecipe,
                        step_factor: float) -> str:
    """The plans' note on how the recipe's epochs were reached."""
    preset = _planner(planner)[1]
    steps = round(preset["training_steps"] * step_factor)
    low, high = preset["epochs"]
    per_fold = per_fold_training_nodes(training_node_count(fingerprint), n_folds)
    return (f"{recipe.num_epochs} epochs: {steps} optimizer steps over about {per_fold:.0f} training nodes per fold "
            f"at batch {recipe.batch_size}, within {low}-{high} epochs; a semi-supervised stage continuing it: "
            f"{recipe.semi_supervised_epochs or recipe.num_epochs} epochs")
