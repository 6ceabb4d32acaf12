"""The science studies beside the claims study: one module each, its script (`python -m ractd_repro.studies.<name>
--help`) and its report (`section`: the part of docs/results.md it renders from its store under docs/results/)."""

from __future__ import annotations

# in the order docs/results.md shows them
ALL = ("eq4_forms", "dsm_forms", "inverse_dynamics_plans", "training_seeds", "term_balance", "bf16_scores",
       "learning_curves", "quick_budget", "training_forms")


def sections(data) -> list[str]:
    """Every study's part of docs/results.md, from the stores under `data` (docs/results/)."""
    import importlib

    parts: list[str] = []
    for name in ALL:
        parts += importlib.import_module(f"{__name__}.{name}").section(data)
    return parts
