"""docs/results.md: the verdict rules on numbers worked out by hand, a document built from a synthetic study whose
tables and verdicts are checked against the store, and the committed document rebuilt from its committed snapshot."""

import argparse
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest

from ractd import RactdError
from ractd.config import to_dict
from ractd_repro import claims, document, figures, tables
from ractd_repro.store import ResultsStore, cell_stats, episode_rows
from ractd_repro.studies import bf16_scores, training_seeds
from ractd_repro.sweep import SearchConfig

REPO = Path(__file__).resolve().parents[1]


def _eps(task, method, scores, ckpt, sigma=float("nan"), nfe=1, sampler="student", batch=10, t=0.01):
    recs = [{"task": task, "seed": i, "return": float(s), "normalized_score": float(s), "length": 10,
             "time_per_action": t, "terminated": False, "truncated": True, "batch_size": batch}
            for i, s in enumerate(scores)]
    return episode_rows(recs, method=method, sampler=sampler, nfe=nfe, checkpoint=ckpt, checkpoint_path="/x.pt",
                        scale="test", sigma=sigma, wall_s=2.0, versions={"ractd": "test"})


def _cell(mean, se, n=100):
    return {"n": n, "mean": mean, "se": se}


def test_verdict_rules_at_two_standard_errors():
    # difference 10, SE of the difference sqrt(3^2 + 4^2) = 5: exactly 2 SE -> not yet a win
    assert claims.better(_cell(60, 3), _cell(50, 4)) == "inconclusive"
    assert claims.better(_cell(60.1, 3), _cell(50, 4)) == "holds"
    assert claims.better(_cell(39.9, 3), _cell(50, 4)) == "does not hold"
    # a reference (the teacher) not above the data's level (50 ± 1) by more than 2 SE: matching it says nothing
    # about distillation -> "not meaningful", whatever the student does; no data cell -> the plain rule
    assert claims.matches(_cell(20, 1), _cell(25, 1), data=_cell(50, 1)) == "not meaningful"
    assert claims.matches(_cell(20, 1), _cell(25, 1)) == "holds"
    assert claims.matches(_cell(60, 1), _cell(25, 1), data=_cell(50, 1)) == "not meaningful"
    assert claims.matches(_cell(47.5, 1), _cell(51, 1), data=_cell(50, 1)) == "not meaningful"  # 51: within 2 SE
    assert claims.matches(_cell(20, 1), _cell(55, 1), data=_cell(50, 1)) == "does not hold"
    assert claims.matches(_cell(52, 1), _cell(55, 1), data=_cell(50, 1)) == "holds"
    # matching within 10 points: -5 - 2*5 = -15 < -10 and -5 + 10 = 5 > -10 -> inconclusive
    assert claims.matches(_cell(45, 3), _cell(50, 4)) == "inconclusive"
    assert claims.matches(_cell(49, 0.5), _cell(50, 0.5)) == "holds"
    assert claims.matches(_cell(20, 1), _cell(50, 1)) == "does not hold"
    assert claims.matches(_cell(80, 1), _cell(50, 1)) == "holds"  # beating the reference is matching it
    # paired: a - b = 0.1 + noise of SE 0.01 -> holds; the unpaired SE would be large
    rng = np.random.default_rng(0)
    b = rng.normal(0, 1, 400)
    a = b + 0.1 + rng.normal(0, 0.1, 400)
    v, m, se = claims.paired(a, b)
    assert v == "holds" and m == pytest.approx(0.1, abs=0.02) and se == pytest.approx(0.005, rel=0.2)
    assert claims.paired(b, a)[0] == "does not hold"


def _study(store: ResultsStore, ractd_scores, ctd_scores, teacher_scores, teacher_t=1.0):
    t = "hopper-medium-replay"
    store.write_episodes(_eps(t, "ractd", ractd_scores, "r", sigma=1.0))
    store.write_episodes(_eps(t, "ctd", ctd_scores, "c", sigma=0.0))
    store.write_episodes(_eps(t, "teacher-heun-80", teacher_scores, "t", nfe=80, sampler="heun", t=teacher_t))
    store.write_episodes(_eps(t, "ractd-sigma-0.3", [40.0 + (i % 5) for i in range(20)], "s3", sigma=0.3))
    store.write_episodes(_eps(t, "ractd-sigma-1.5", [10.0 + (i % 5) for i in range(20)], "s15", sigma=1.5))
    store.write_episodes(_eps(t, "ractd-nfe2", [v + 1 for v in ractd_scores], "r", nfe=2))
    store.write_rewards([{"task": t, "method": m, "checkpoint": "x", "state_index": k, "reward": r + 0.01 * k,
                          "reward_checkpoint": "rw", "scale": "test"}
                         for m, r in (("ractd", 0.5), ("ctd", 0.2)) for k in range(50)])


def _sweep_dir(root: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = root / "sweep"
    rows = []
    for i, sigma in enumerate((1.0, 0.0)):
        tdir = d / "trials" / f"t{i}" / "student"
        tdir.mkdir(parents=True)
        lines = [{"step": s, "at_checkpoint": True, "select_score": 10.0 * s / 100 + i, "ctm": 0.1, "dsm": 1.0,
                  "reward": -0.5, "at_bound": 0.42 if sigma else 0.01, "out_of_range": 0.3 if sigma else 0.0,
                  "r_student": 0.9, "r_data": 0.5, "r_gap": 0.4 if sigma else -0.1} for s in (100, 200)]
        lines.insert(1, {"step": 150, "at_checkpoint": False, "loss": 1.0})
        (tdir / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
        rows.append({"trial_id": f"t{i}", "alpha": 1.0, "beta": 1.0, "sigma": sigma, "select_score": 20.0 + i,
                     "last_score": 20.0 + i, "step": 200, "status": "completed", "train_time_s": 120.0,
                     "trial_time_s": 150.0, "checkpoint": "/x.pt"})
    pq.write_table(pa.Table.from_pylist(rows), d / "trials.parquet")
    (d / "search.json").write_text(json.dumps({"config": {"budget": "cpu", "steps": 200, "sigmas": [0.0]},
                                               "shared": {"dir": str(root / "nowhere")}}))
    return d


def test_document_from_a_synthetic_study_carries_the_stores_numbers(tmp_path):
    store = ResultsStore(tmp_path / "store")
    ractd = [60.0 + (i % 7) for i in range(100)]
    ctd = [30.0 + (i % 7) for i in range(100)]
    teacher = [33.0 + (i % 3) for i in range(10)]
    _study(store, ractd, ctd, teacher)
    data = document.snapshot(store, {"hopper-medium-replay": _sweep_dir(tmp_path)}, tmp_path / "snap")
    (data / "provenance.json").write_text(json.dumps({"commands": ["python eval/results_doc.py"], "machine": "m"}))
    text = document.render(data)
    # every table of the document is the table rebuilt from the snapshot's store
    rows = ResultsStore(data / "store").episodes()
    assert len(rows) == 100 + 100 + 10 + 20 + 20 + 100
    for fn in tables.TABLES.values():
        assert fn(rows).markdown in text
    v = {(x["claim"][:2], x["task"]): x for x in claims.claims(rows, ResultsStore(data / "store").rewards(),
                                                               document._sweep_tables(data))}
    t = "hopper-medium-replay"
    assert v[("2a", t)]["verdict"] == "holds"       # 63 vs 33, SE ~0.2
    assert v[("1.", t)]["verdict"] == "holds"       # CTD 33.0 vs teacher 33.9: within 10 points
    assert v[("2c", t)]["verdict"] == "holds"       # sigma 1 and 0.3 beat CTD (sigma 1.5 does not)
    assert "sigma 1.5: -21.0" in v[("2c", t)]["evidence"] and "(does not hold)" in v[("2c", t)]["evidence"]
    assert v[("3.", t)]["verdict"] == "holds"       # R_psi 0.5 vs 0.2 on the same states
    assert "42% of chunk elements at the clamp bound" in v[("3.", t)]["evidence"]
    assert v[("4a", t)]["verdict"] == "holds" and v[("4b", t)]["verdict"] == "holds"  # 1.5 is below 1.0's 63
    assert v[("5.", t)]["verdict"] == "holds"       # 2 steps = 1 step + 1 exactly: SE of the difference ~0.3
    # Heun-80 is 79 steps x 2 = 158 network calls: 100x holds (>= 79x), and the claims name that cost
    assert v[("6.", t)]["verdict"] == "holds" and "100x for 158x the network calls" in v[("6.", t)]["evidence"]
    assert "teacher's Heun-80 (158 network calls)" in v[("1.", t)]["claim"]
    assert "159" not in text and "Heun-80 (158 network calls)" in text
    c = cell_stats(ractd)
    assert f"RACTD (sigma 1) {c['mean']:.1f} ± {c['se']:.1f} (n=100)" in v[("2a", t)]["evidence"]
    assert "**holds**" in text and "python eval/results_doc.py" in text
    assert "2 students: 4.0 min of training (5.0 min" in text  # 2 trials x 120 s
    for name in ("fig3_returns.png", "rpsi_dataset_states.png", "fig4_sigma.png", "fig4_curves.png",
                 "score_distribution.png"):
        assert (data / "figures" / name).stat().st_size > 1000 and f"results/figures/{name}" in text
    # the curves keep checkpoints only (the step-150 log line is not one)
    import pyarrow.parquet as pq

    steps = sorted(r["step"] for r in pq.read_table(data / "sweeps" / t / "curves.parquet").to_pylist())
    assert steps == [100, 100, 200, 200]
    # reversed numbers reverse the verdict; overlapping ones are inconclusive
    for a, b, want in ((ctd, ractd, "does not hold"), ([50.0, 60.0] * 5, [52.0, 58.0] * 5, "inconclusive")):
        s2 = ResultsStore(tmp_path / f"s-{want}")
        _study(s2, a, b, teacher)
        got = {x["claim"][:2]: x["verdict"] for x in claims.claims(s2.episodes(), s2.rewards(), {})}
        assert got["2a"] == want
    # no sigma beats CTD: RACTD and every sigma cell below it -> "does not hold" at every sigma tried
    s3 = ResultsStore(tmp_path / "s-none")
    _study(s3, [5.0 + (i % 3) for i in range(100)], [80.0 + (i % 3) for i in range(100)], teacher)
    got = {x["claim"][:2]: x for x in claims.claims(s3.episodes(), s3.rewards(), {})}
    assert got["2c"]["verdict"] == "does not hold" and got["2c"]["evidence"].count("(does not hold)") == 3


def test_a_sigma_zero_ractd_is_not_claimed_to_beat_ctd(tmp_path):
    store = ResultsStore(tmp_path / "store")
    store.write_episodes(_eps("maze2d-umaze", "ractd", [100.0, 120.0], "m", sigma=0.0))
    store.write_episodes(_eps("maze2d-umaze", "ctd", [100.0, 120.0], "m", sigma=0.0))
    (v,) = [x for x in claims.claims(store.episodes(), [], {}) if x["claim"].startswith("2a")]
    assert v["verdict"] == "not measured" and "sigma = 0" in v["evidence"]
    # the inverse-dynamics tracker far below the PD rule on the same plans does not match it
    store.write_episodes(_eps("maze2d-umaze", "ractd-invdyn-plan", [-10.0, -12.0], "m", sigma=0.0))
    (v,) = [x for x in claims.claims(store.episodes(), [], {}) if x["claim"].startswith("7.")]
    assert v["verdict"] == "does not hold" and "difference -121.0" in v["evidence"]
    # on locomotion a sweep that picks sigma = 0 as its best student says RACTD did not beat CTD
    store.write_episodes(_eps("hopper-medium-replay", "ractd", [10.0, 12.0], "h", sigma=0.0))
    store.write_episodes(_eps("hopper-medium-replay", "ctd", [10.0, 12.0], "h", sigma=0.0))
    (v,) = [x for x in claims.claims(store.episodes(), [], {}) if x["claim"].startswith("2a")
            and x["task"] == "hopper-medium-replay"]
    assert v["verdict"] == "does not hold" and "picked sigma = 0" in v["evidence"]
    same = [{"task": "hopper-medium-replay", "method": m, "checkpoint": "h", "state_index": k, "reward": 0.1,
             "reward_checkpoint": "rw", "scale": "test"} for m in ("ractd", "ctd") for k in range(4)]
    (v,) = [x for x in claims.claims(store.episodes(), same, {}) if x["claim"].startswith("3.")]
    assert v["verdict"] == "not measured" and "compares CTD with itself" in v["evidence"]
    # Fig. 4 with that pick: RACTD and CTD are both the sigma = 0 point (their episodes differ, as two evaluations
    # of one checkpoint can); sigma 0 is listed once, from CTD's cell
    store.write_episodes(_eps("hopper-medium-replay", "ractd", [11.0, 13.0], "h2", sigma=0.0))
    for s, sc in ((0.4, [20.0, 22.0]), (1.0, [5.0, 7.0])):
        store.write_episodes(_eps("hopper-medium-replay", f"ractd-sigma-{s:g}", sc, f"s{s}", sigma=s))
    v = {x["claim"][:2]: x for x in claims.claims(store.episodes(), [], {}) if x["task"] == "hopper-medium-replay"}
    assert v["4a"]["evidence"] == "best sigma 0.4; sigma 0: 11.0 ± 1.0, sigma 0.4: 21.0 ± 1.0, sigma 1: 6.0 ± 1.0"


def test_committed_document_is_rebuilt_exactly_from_its_committed_snapshot():
    """Every number in docs/results.md traces to docs/results/: rebuilding it (without writing) gives the same text."""
    data = REPO / "docs" / "results"
    text = document.render(data, write=False)
    assert text == (REPO / "docs" / "results.md").read_text()
    rows = ResultsStore(data / "store").episodes()
    assert rows and all(math.isfinite(r["normalized_score"]) for r in rows)


def test_a_model_below_bc_or_the_data_is_a_finding_the_document_states(tmp_path):
    """Claims 8a/8b: the teacher (33-35) scores below BC (50) by ~16 points, every model is above the data (5);
    without the baseline cells the claims say "not measured"."""
    store = ResultsStore(tmp_path / "store")
    ractd = [60.0 + (i % 7) for i in range(100)]
    _study(store, ractd, [30.0 + (i % 7) for i in range(100)], [33.0 + (i % 3) for i in range(10)])
    rows = store.episodes()
    v = {x["claim"][:2]: x for x in claims.claims(rows, [], {})}
    assert v["8a"]["verdict"] == v["8b"]["verdict"] == "not measured"
    t = "hopper-medium-replay"
    store.write_episodes(_eps(t, "bc", [50.0 + (i % 2) for i in range(100)], "b", sampler="bc"))
    store.write_episodes(_eps(t, "data", [5.0 + (i % 2) for i in range(40)], "d", sampler="data", nfe=0))
    verdicts = claims.claims(store.episodes(), [], {})
    v = {x["claim"][:2]: x for x in verdicts}
    assert v["8a"]["verdict"] == "does not hold" and v["8b"]["verdict"] == "holds"
    found = claims.findings(verdicts)
    teacher_below = 50.5 - np.mean([33.0 + (i % 3) for i in range(10)])
    assert len(found) == 2 and any(f"teacher Heun-80 (158 network calls) scores below BC by {teacher_below:.1f}" in f
                                   for f in found)
    assert any("CTD scores below BC" in f for f in found) and not any("RACTD" in f for f in found)


def test_heun_80_is_158_network_calls_and_the_speed_rule_counts_them(tmp_path):
    """Counting the denoiser's calls in edm.sample_heun over the 80 Karras bins gives 158 (79 steps x 2), which is
    what tables.network_calls says; a 50x speed-up is then below half the ratio (79x): 'does not hold' (it held
    when the teacher's cost was counted as 80 NFE)."""
    import torch

    from ractd import edm

    calls = []

    def denoise(x, sigma):
        calls.append(1)
        return torch.zeros_like(x)

    edm.sample_heun(denoise, torch.randn(2, 4, 3), edm.karras_sigmas(edm.N_BINS))
    assert len(calls) == tables.network_calls("heun", edm.N_BINS) == 158
    assert tables.sampler_name("heun", 80) == "Heun-80 (158 network calls)"
    store = ResultsStore(tmp_path / "store")
    _study(store, [60.0] * 10, [30.0] * 10, [33.0] * 10, teacher_t=0.5)
    (v,) = [x for x in claims.claims(store.episodes(), [], {}) if x["claim"].startswith("6.")]
    assert v["verdict"] == "does not hold" and "50x for 158x the network calls" in v["evidence"]


def test_matching_below_the_data_and_a_sigma_zero_ractd_are_named_in_verdicts_tables_and_fig3(tmp_path):
    """Claim 1 on a teacher and a CTD student both below the data's level reads "not meaningful"; without the data
    cell it keeps the old verdict and says "data level not measured". A RACTD cell whose episodes carry sigma = 0
    (walker2d's sweep picked it) is named as CTD in the verdicts and in every table, read from the cell's sigma."""
    t = "walker2d-medium"
    store = ResultsStore(tmp_path / "store")
    store.write_episodes(_eps(t, "ctd", [26.0 + (i % 3) for i in range(100)], "c", sigma=0.0))
    store.write_episodes(_eps(t, "ractd", [26.0 + (i % 3) for i in range(100)], "c", sigma=0.0))
    store.write_episodes(_eps(t, "teacher-heun-80", [23.0 + (i % 3) for i in range(10)], "t", nfe=80,
                              sampler="heun", t=1.0))
    sweeps = {t: {"trials": [{"sigma": 0.0}, {"sigma": 0.4}]}}
    v = {x["claim"][:2]: x for x in claims.claims(store.episodes(), [], sweeps)}
    assert v["1."]["verdict"] == "holds" and "data level not measured" in v["1."]["evidence"]
    assert "RACTD (the sweep's pick: σ = 0, i.e. CTD)" in v["2a"]["evidence"]
    assert "RACTD (σ = 0, i.e. CTD)" in claims._ractd_label(store.episodes(), t, {})
    store.write_episodes(_eps(t, "data", [60.0 + (i % 5) for i in range(40)], "d", sampler="data", nfe=0))
    v = {x["claim"][:2]: x for x in claims.claims(store.episodes(), [], sweeps)}
    assert v["1."]["verdict"] == "not meaningful" and "the data's own level 62.0" in v["1."]["evidence"]
    assert "RACTD (the sweep's pick: σ = 0, i.e. CTD) " in v["8b"]["evidence"]
    for fn, row in ((tables.table1, t), (tables.table3, "RACTD (Student) 1")):
        md = fn(store.episodes()).markdown
        ractd_line = next(line for line in md.splitlines() if row in line)
        assert "RACTD (σ = 0, i.e. CTD)" in ractd_line
    # a RACTD cell at sigma > 0 is not renamed
    s2 = ResultsStore(tmp_path / "s2")
    _study(s2, [60.0] * 10, [30.0] * 10, [33.0] * 10)
    assert "i.e. CTD" not in tables.table1(s2.episodes()).markdown
    assert claims._ractd_label(s2.episodes(), "hopper-medium-replay", {}) == "RACTD"
    # Fig. 3 from the episodes; a task without them gets a panel saying so (the image is still written)
    p = figures.fig_return_dist(store.episodes(), tmp_path / "f.png", tasks=[t, "hopper-medium-replay"])
    assert p.stat().st_size > 5000


def _seed_row(method, seed, best, final=None, sem=1.0):
    final = best if final is None else final
    return {"method": method, "train_seed": seed, "best_mean": best, "best_sem": sem, "final_mean": final,
            "final_sem": sem, "n": 100}


def test_training_seed_verdict_holds_only_when_ractd_beats_on_every_training_seed():
    """RACTD beats CTD by > 2 SE on seeds 0 and 1 but ties on seed 2 (selected) -> inconclusive; at the final
    checkpoints it beats on all three -> holds; below BC on every seed -> does not hold."""
    rows = [_seed_row("ctd", s, 10.0) for s in range(3)] + [_seed_row("bc", s, 50.0) for s in range(3)]
    rows += [_seed_row("ractd", 0, 20.0), _seed_row("ractd", 1, 20.0), _seed_row("ractd", 2, 12.0, final=20.0)]
    got = {(v["b"], v["checkpoint"]): v for v in training_seeds.seed_verdicts(rows)}
    assert got[("ctd", "selected")]["verdict"] == "inconclusive"
    assert [p["outcome"] for p in got[("ctd", "selected")]["per_seed"]] == ["beats", "beats", "ties"]
    assert got[("ctd", "final")]["verdict"] == "holds"
    assert got[("ctd", "final")]["per_seed"][0]["diff"] == pytest.approx(10.0)
    assert got[("ctd", "final")]["per_seed"][0]["se"] == pytest.approx(math.sqrt(2.0))
    assert got[("bc", "selected")]["verdict"] == "does not hold"
    assert ("bc10", "selected") not in got  # no 10% BC row yet
    rows += [_seed_row("bc10", s, 15.0, sem=0.5) for s in range(3)]  # 10% BC (CORL's): RACTD's bar on replay data
    got = {(v["b"], v["checkpoint"]): v for v in training_seeds.seed_verdicts(rows)}
    assert [p["outcome"] for p in got[("bc10", "selected")]["per_seed"]] == ["beats", "beats", "below"]
    assert got[("bc10", "final")]["verdict"] == "holds"
    text = "\n".join(training_seeds.seed_report(rows + [{"method": "data", "train_seed": -1, "best_mean": 30.0,
                                                 "best_sem": 2.0, "n": 40, "behavior": 31.5}], "hopper-medium-replay"))
    assert "ractd: over 3 training seeds" in text and "17.3 (sd 4.6, 12.0 to 20.0)" in text
    assert "The data's own level: 30.0 ± 2.0 over the dataset's 40 complete episodes" in text
    assert "RACTD vs CTD, final checkpoints: **holds** on 3 training seed(s)" in text
    assert "RACTD vs BC10, final checkpoints: **holds** on 3 training seed(s)" in text
    assert "bc10: over 3 training seeds" in text
    assert "Multi-step" not in text  # no row was evaluated with more steps
    next(r for r in rows if (r["method"], r["train_seed"]) == ("ractd", 2)).update(
        nfe2_mean=15.0, nfe2_sem=0.5, nfe4_mean=float("nan"), nfe4_sem=float("nan"))
    text = "\n".join(training_seeds.seed_report(rows, "hopper-medium-replay"))
    assert "ractd seed 2: 1 step 12.0 ± 1.0, 2 steps 15.0 ± 0.5." in text  # the NaN 4-step value is left out


def test_training_seed_bc_methods_are_corls_bc_and_10_percent_bc():
    """bc and bc10 train TrainConfig stage "bc" on all trajectories and on the best tenth by return."""
    ns = argparse.Namespace(task="hopper-medium-replay", scale="tiny", bc_steps=0)
    cfgs = {m: training_seeds.method_config(ns, m, 1, Path("/nowhere"), "", "") for m in ("bc", "bc10")}
    assert {m: (c.stage, c.bc_top_fraction, c.seed) for m, c in cfgs.items()} == {"bc": ("bc", 1.0, 1),
                                                                                 "bc10": ("bc", 0.1, 1)}
    assert cfgs["bc10"].run_dir != cfgs["bc"].run_dir


def test_training_seed_students_train_in_the_form_asked_for():
    ns = argparse.Namespace(task="hopper-medium-replay", scale="tiny", sigma=1.0, steps=10, batch=8, ckpt_every=5,
                            accel="nhwc")
    assert training_seeds.method_config(ns, "ractd", 0, Path("/nowhere"), "t.pt", "r.pt").accel == "nhwc"
    del ns.accel  # a caller without the flag keeps the default
    assert training_seeds.method_config(ns, "ctd", 0, Path("/nowhere"), "t.pt", "r.pt").accel == "auto"

def test_teacher_rows_rule_against_the_behavior_policy_and_bc():
    """Teachers at 41 +- 1 and 38.5 +- 2 against a behavior policy at 38: both at or above -> holds; a third at
    37 +- 2 (below, within 2 SE) -> inconclusive; every teacher clearly below -> does not hold. Against BC at
    41.6: per seed, final checkpoints only."""
    data = {"method": "data", "train_seed": -1, "best_mean": 36.0, "best_sem": 0.5, "n": 80, "behavior": 38.0}
    rows = [data, _seed_row("teacher", 0, 41.0), _seed_row("teacher", 1, 38.5, sem=2.0)]
    rows += [_seed_row("bc", s, 41.6, sem=0.5) for s in range(3)]
    text = "\n".join(training_seeds.seed_report(rows, "walker2d-medium"))
    assert "behavior policy's level (38.0): **holds** on 2 training seed(s)" in text
    assert "seed 0: 41.0 ± 1.0, n=100 (at or above)" in text and "seed 1: 38.5 ± 2.0, n=100 (at or above)" in text
    assert "TEACHER vs BC, final checkpoints" in text and "selected checkpoints" not in text.split("TEACHER vs BC")[1]
    got = {v["a"]: v for v in training_seeds.seed_verdicts(rows)}
    assert [p["outcome"] for p in got["teacher"]["per_seed"]] == ["ties", "ties"]  # -0.6 +- 1.1, -3.1 +- 2.1
    text = "\n".join(training_seeds.seed_report(rows + [_seed_row("teacher", 2, 37.0, sem=2.0)], "walker2d-medium"))
    assert "(38.0): **inconclusive** on 3 training seed(s)" in text and "mean over training seeds 38.8" in text
    assert "seed 2: 37.0 ± 2.0, n=100 (below, within 2 SE)" in text
    text = "\n".join(training_seeds.seed_report(rows + [_seed_row("ctd", 0, 46.0)], "walker2d-medium"))
    assert "CTD (selected checkpoint) minus the teacher it distils (training seed 0's, Heun-80 41.0 ± 1.0): " \
           "seed 0: +5.0 ± 1.4." in text
    low = [data] + [_seed_row("teacher", s, 30.0) for s in range(2)]
    assert "(38.0): **does not hold**" in "\n".join(training_seeds.seed_report(low, "walker2d-medium"))


def test_studies_section_renders_each_store_under_the_snapshot(tmp_path):
    import pandas as pd

    (tmp_path / "seeds" / "hopper-medium-replay-small").mkdir(parents=True)
    rows = [_seed_row(m, s, v) for s in range(2) for m, v in (("ctd", 10.0), ("ractd", 30.0), ("bc", 20.0))]
    pd.DataFrame(rows).to_parquet(tmp_path / "seeds" / "hopper-medium-replay-small" / "results.parquet")
    text = "\n".join(document.studies_section(tmp_path))
    assert ("### Teachers, students and BC on several training seeds (ractd_repro.studies.training_seeds): "
            "hopper-medium-replay-small") in text
    assert "RACTD vs CTD, selected checkpoints: **holds** on 2 training seed(s)" in text
    assert "RACTD vs BC, selected checkpoints: **holds**" in text
    assert document.studies_section(tmp_path / "empty") == []


def test_bf16_report_calls_a_shift_below_the_evaluations_resolution_unchanged():
    rng = np.random.default_rng(0)
    base = rng.normal(50.0, 10.0, 100)  # score SE ~1.0
    rows = []
    for case, shift in (("small", 0.3), ("big", 3.0)):
        for s, v in enumerate(base):
            rows.append({"case": case, "precision": "fp32", "seed": s, "normalized": float(v)})
            rows.append({"case": case, "precision": "bf16", "seed": s, "normalized": float(v + shift
                                                                                         + rng.normal(0, 0.1))})
    lines = {line.split("|")[1].strip(): line for line in bf16_scores.bf16_report(rows)[0].splitlines()[2:]}
    # 29 paired SE, yet a third of the score's SE: unchanged
    assert lines["small"].rstrip(" |").endswith("unchanged") and "+0.29 ± 0.01" in lines["small"]
    assert lines["big"].rstrip(" |").endswith("CHANGED") and "+2.99" in lines["big"]  # 3 score SEs


def test_balance_report_compares_each_point_with_the_raw_point_of_its_role():
    from ractd_repro.studies.term_balance import balance_report

    def row(scale, sigma, seed, mean, sem):
        return {"term_scale": scale, "sigma": sigma, "train_seed": seed, "best_mean": mean, "best_sem": sem,
                "final_mean": mean - 1, "final_sem": sem, "ctm": 0.06, "dsm": 30.0, "reward": 0.5,
                "share_ctm": 0.0, "share_dsm": 1.0, "share_reward": 0.0, "at_bound": 0.01}

    rows = [row("raw", 0.0, 0, 10.0, 0.2), row("raw", 0.3, 0, 27.0, 0.4), row("raw", 0.3, 1, 30.0, 0.5),
            row("gradient", 0.0, 0, 10.3, 0.2), row("gradient", 0.03, 0, 22.0, 0.3),
            row("gradient", 0.03, 1, 32.0, 0.5), row("balanced", 1.0, 1, 40.0, 0.5)]
    text = "\n".join(balance_report(rows))
    assert "gradient σ = 0 minus raw CTD, selected checkpoints: seed 0: +0.3 ± 0.3 → mixed or level" in text
    assert "gradient σ = 0.03 minus raw RACTD (σ = 0.3), selected checkpoints: seed 0: -5.0 ± 0.5, seed 1: " \
           "+2.0 ± 0.7 → mixed or level on 2 training seed(s)" in text
    assert "balanced σ = 1 minus raw RACTD (σ = 0.3), selected checkpoints: seed 1: +10.0 ± 0.7 → above" in text
    assert "0: 22.0 ± 0.3 (21.0); 1: 32.0 ± 0.5 (31.0)" in text


def test_a_sweep_run_with_other_settings_is_not_snapshotted_and_the_earlier_copy_stays(tmp_path, caplog):
    """The README's quick sweep shares maze2d-umaze's sweep folder with the studies' sweeps: a snapshot after it
    must not replace the study's sweep record by the quick one."""
    store = ResultsStore(tmp_path / "store")
    _study(store, [60.0] * 100, [30.0] * 100, [33.0] * 10)
    d = _sweep_dir(tmp_path)
    flags = {"hopper-medium-replay": "--steps 200 --sigmas 0"}
    snap = tmp_path / "snap"
    document.snapshot(store, {"hopper-medium-replay": d}, snap, flags)
    first = (snap / "sweeps" / "hopper-medium-replay" / "trials.parquet").read_bytes()
    search = json.loads((d / "search.json").read_text())
    search["config"].update(budget="quick", steps=75)  # the quick sweep, run into the same folder
    (d / "search.json").write_text(json.dumps(search))
    import pyarrow.parquet as pq
    rows = pq.read_table(d / "trials.parquet").to_pylist()
    pq.write_table(pq.read_table(d / "trials.parquet").slice(0, 1), d / "trials.parquet")
    with caplog.at_level(logging.WARNING):
        document.snapshot(store, {"hopper-medium-replay": d}, snap, flags)
    assert (snap / "sweeps" / "hopper-medium-replay" / "trials.parquet").read_bytes() == first and len(rows) == 2
    assert "budget 'quick' (the study's 'cpu')" in caplog.text and "steps 75 (the study's 200)" in caplog.text
    document.snapshot(store, {"hopper-medium-replay": d}, snap)  # without the study's flags: copied as before
    assert len(pq.read_table(snap / "sweeps" / "hopper-medium-replay" / "trials.parquet")) == 1


def test_a_sweeps_settings_are_compared_with_its_flags_resources_aside():
    from ractd_repro.sweep import differs_from_flags

    cfg = {**to_dict(SearchConfig(task="walker2d-medium")), "steps": 400, "batch": 128, "sigmas": [0, 0.4]}
    assert differs_from_flags(cfg, "walker2d-medium", "--steps 400 --batch 128 --sigmas 0 0.4") == []
    assert differs_from_flags({**cfg, "cpus_per_worker": 1, "max_concurrent": 2}, "walker2d-medium",
                              "--steps 400 --batch 128 --sigmas 0 0.4") == []  # where it ran, not what it trained
    assert differs_from_flags(cfg, "walker2d-medium", "--steps 400 --batch 128 --sigmas 0 1") == \
        ["sigmas [0, 0.4] (the study's [0.0, 1.0])"]
    with pytest.raises(RactdError, match="not SearchConfig flags: --bogus"):
        differs_from_flags(cfg, "walker2d-medium", "--bogus 3")


def test_a_study_run_in_pieces_keeps_every_machine_its_pieces_ran_on():
    assert document.machines("", "xeon", pieces=True) == "xeon"
    assert document.machines("xeon", "epyc", pieces=True) == "xeon; later pieces: epyc"
    assert document.machines("xeon; later pieces: epyc", "epyc", pieces=True) == "xeon; later pieces: epyc"
    assert document.machines("xeon", "epyc", pieces=False) == "epyc"  # a study run whole: where it ran
