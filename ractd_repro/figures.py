"""The paper's figures (matplotlib Agg) from the results store and the sweeps' curves.

Figures (matplotlib Agg): Fig. 3 (the return distribution of CTD's and RACTD's rollouts, from the episodes), a
diagnostic beside it (histograms of R_psi of the first actions sampled by teacher, CTD and RACTD on dataset states,
from the rewards dataset), Fig. 4 (normalized score against the reward weight sigma),
and the distribution of episode scores per method.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ractd_repro.store import ResultsStore, _group, cell_stats
from ractd_repro.tables import CTD_NOTE, is_ctd


def _savefig(fig, path: Path) -> Path:
    from ractd.io import atomic_write

    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


FIG3_METHODS = (("teacher-heun-80", "Teacher (Heun-80)"), ("ctd", "CTD"), ("ractd", "RACTD"))


def fig_reward_hist(reward_rows: list[dict], path) -> Path | None:
    """Diagnostic beside Fig. 3: histograms of R_psi(s, a) of the actions each method samples on the same dataset
    states (the paper's Fig. 3 is the return distribution of rollouts: fig_return_dist)."""
    tasks = sorted({r["task"] for r in reward_rows})
    if not tasks:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        vals = {m: np.array([r["reward"] for r in reward_rows if r["task"] == task and r["method"] == m])
                for m, _ in FIG3_METHODS}
        allv = np.concatenate([v for v in vals.values() if len(v)])
        bins = np.linspace(allv.min(), allv.max() + 1e-9, 40)
        for m, label in FIG3_METHODS:
            if len(vals[m]):
                ax.hist(vals[m], bins=bins, alpha=0.5, label=f"{label} (mean {vals[m].mean():.3f})")
        scale = "/".join(sorted({r["scale"] for r in reward_rows if r["task"] == task}))
        ax.set(title=f"{task} [{scale}]", xlabel="R_psi(s, a) (normalized return-to-go)", ylabel="actions")
        ax.legend(fontsize=8)
    fig.suptitle("Diagnostic: R_psi of sampled actions on dataset states (not the paper's Fig. 3)")
    return _savefig(fig, Path(path))


FIG3_RETURN_METHODS = (("ctd", "CTD"), ("ractd", "RACTD"))


def fig_return_dist(rows: list[dict], path, tasks: list[str] | None = None) -> Path | None:
    """Fig. 3 as the paper draws it: the distribution (histogram, density-normalized) of the per-episode normalized
    returns of CTD's and RACTD's rollouts, one panel per task, from the stored episodes. A task whose store lacks
    either cell's episodes gets a panel that says so; a RACTD cell at sigma = 0 is named as CTD's student."""
    g = _group(rows)
    tasks = sorted({t for t, _ in g}) if tasks is None else list(tasks)
    if not tasks:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        eps = {m: g.get((task, m)) for m, _ in FIG3_RETURN_METHODS}
        missing = [label for m, label in FIG3_RETURN_METHODS if not eps[m]]
        ax.set(title=task, xlabel="normalized return per episode", ylabel="density")
        if missing:
            ax.text(0.5, 0.5, f"no {' or '.join(missing)} episodes\nin this snapshot", ha="center", va="center",
                    transform=ax.transAxes)
            continue
        vals = {m: np.array([r["normalized_score"] for r in eps[m]]) for m, _ in FIG3_RETURN_METHODS}
        allv = np.concatenate(list(vals.values()))
        bins = np.linspace(allv.min(), allv.max() + 1e-9, 30)
        for m, label in FIG3_RETURN_METHODS:
            if m == "ractd" and is_ctd(eps[m]):
                label = f"RACTD ({CTD_NOTE})"
            ax.hist(vals[m], bins=bins, density=True, alpha=0.5,
                    label=f"{label}: mean {vals[m].mean():.1f}, n={len(vals[m])}")
        ax.set_title(f"{task} [{'/'.join(sorted({r['scale'] for m in eps for r in eps[m]}))}]")
        ax.legend(fontsize=8)
    fig.suptitle("Fig. 3: return distribution of CTD and RACTD rollouts")
    fig.tight_layout()
    return _savefig(fig, Path(path))


def sigma_points(rows: list[dict]) -> dict[str, list[tuple[float, dict]]]:
    """{task: [(sigma, cell_stats), ...]} of the one-step students (CTD, RACTD, the sigma sweep) from an
    unconditioned teacher, sorted by sigma; one point per sigma (the first method found at that sigma)."""
    g = _group(rows)
    out: dict[str, dict[float, dict]] = {}
    for (task, mid), eps in g.items():
        if mid in ("ctd", "ractd") or mid.startswith("ractd-sigma-"):
            sigma = float(eps[0]["sigma"])
            out.setdefault(task, {}).setdefault(sigma, cell_stats([r["normalized_score"] for r in eps]))
    return {t: sorted(d.items()) for t, d in out.items()}


def fig_sigma(rows: list[dict], path) -> Path | None:
    """Fig. 4 counterpart: final normalized score (mean ± SE over episodes) against the reward weight sigma."""
    pts = {t: p for t, p in sigma_points(rows).items() if len(p) >= 2}
    if not pts:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for task, p in pts.items():
        s = np.array([x for x, _ in p])
        m = np.array([c["mean"] for _, c in p])
        e = np.array([0.0 if math.isnan(c["se"]) else c["se"] for _, c in p])
        scale = "/".join(sorted({r["scale"] for r in rows if r["task"] == task}))
        ax.errorbar(s, m, yerr=e, marker="o", capsize=3, label=f"{task} [{scale}]")
    ax.set(xlabel="reward weight sigma (Eq. 9)", ylabel="normalized score", title="Fig. 4: score vs sigma")
    ax.legend(fontsize=8)
    return _savefig(fig, Path(path))


def fig_score_distribution(rows: list[dict], path) -> Path | None:
    """Distribution of episode scores per method (one panel per task): box plot with every episode drawn."""
    g = _group(rows)
    tasks = sorted({t for t, _ in g})
    if not tasks:
        return None
    plt = _plt()
    fig, axes = plt.subplots(len(tasks), 1, figsize=(8, 3.2 * len(tasks)), squeeze=False)
    rng = np.random.default_rng(0)
    for ax, task in zip(axes[:, 0], tasks):
        methods = sorted(m for t, m in g if t == task)
        data = [np.array([r["normalized_score"] for r in g[(task, m)]]) for m in methods]
        ax.boxplot(data, showfliers=False)
        for i, d in enumerate(data, start=1):
            ax.scatter(i + rng.uniform(-0.15, 0.15, len(d)), d, s=5, alpha=0.4)
        ax.set_xticks(range(1, len(methods) + 1), methods, rotation=30, ha="right", fontsize=8)
        scale = "/".join(sorted({r["scale"] for r in rows if r["task"] == task}))
        ax.set(title=f"{task} [{scale}]", ylabel="normalized score")
    fig.suptitle("Episode scores per method")
    fig.tight_layout()
    return _savefig(fig, Path(path))


def build_figures(store: ResultsStore, out) -> list[Path]:
    """fig3_returns.png, fig3_reward_hist.png (the R_psi diagnostic), fig4_sigma.png, score_distribution.png under
    `out` (those with data)."""
    out = Path(out)
    rows = store.episodes()
    made = [fig_return_dist(rows, out / "fig3_returns.png"),
            fig_reward_hist(store.rewards(), out / "fig3_reward_hist.png"),
            fig_sigma(rows, out / "fig4_sigma.png"),
            fig_score_distribution(rows, out / "score_distribution.png")]
    return [p for p in made if p is not None]
