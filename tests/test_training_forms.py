"""The training-forms study: which runs it adopts from quick_budget, and its rule over paired training seeds."""

import json
import math

import numpy as np

from ractd_repro.studies import quick_budget
from ractd_repro.studies import training_forms as tf


def _row(form, seed, mean, policy="student"):
    return {"form": form, "seed": seed, "policy": policy, "mean": mean, "se": 3.0, "n": 100,
            **{f"{s}_{k}": math.nan for s in ("teacher", "student") for k in ("cpu_s", "wall_s")}}


def test_each_form_is_compared_with_the_first_over_the_seeds_both_have():
    rows = [_row("eager", 0, 120.0), _row("eager", 1, 110.0), _row("eager", 2, 130.0),
            _row("nhwc", 0, 118.0), _row("nhwc", 1, 114.0), _row("nhwc", 2, 125.0), _row("nhwc", 3, 10.0),
            _row("gemm", 0, 60.0), _row("gemm", 1, 62.0), _row("gemm", 2, 58.0),
            _row("nhwc", 0, 1.0, policy="heun")]  # another policy: not in this comparison
    got = {c["form"]: c for c in tf.compare(rows)}
    nhwc, gemm = got["nhwc"], got["gemm"]
    assert nhwc["seeds"] == [0, 1, 2] and nhwc["reference"] == "eager"  # seed 3 has no eager run
    se = math.hypot(np.std([120, 110, 130], ddof=1) / math.sqrt(3), np.std([118, 114, 125], ddof=1) / math.sqrt(3))
    assert math.isclose(nhwc["difference"], 119.0 - 120.0) and math.isclose(nhwc["se"], se)
    assert nhwc["unchanged"] and nhwc["per_seed"] == [-2.0, 4.0, -5.0]
    assert not gemm["unchanged"]  # 60 against 120 with seed SEs of a few points
    text = "\n".join(tf.report_lines(rows))
    assert "student, nhwc vs eager on seeds [0, 1, 2]: mean of seeds 119.0 vs 120.0, -1.0" in text
    assert "gemm vs eager" in text and "CHANGED" in text
    assert tf.compare([_row("eager", 0, 1.0), _row("nhwc", 0, 2.0)]) == []  # one seed: no SE over seeds


def _stage(folder, accel, steps=10, last=10, autocast=None):
    folder.mkdir(parents=True)
    extra = {} if autocast is None else {"autocast": autocast}  # the first committed runs' configs had none
    (folder / "config.json").write_text(json.dumps({"accel": accel, "steps": steps, **extra}))
    (folder / "metrics.jsonl").write_text(json.dumps({"step": last}) + "\n")


def test_the_eager_form_adopts_a_finished_eager_quick_budget_run_only(tmp_path, monkeypatch):
    monkeypatch.setenv("RACTD_CACHE_DIR", str(tmp_path))
    qb = quick_budget.runs_root()
    _stage(qb / "t1200-s0" / "teacher", "eager")
    _stage(qb / "t1200-s0" / "student", "eager")
    _stage(qb / "t1200-s1" / "teacher", "eager")
    _stage(qb / "t1200-s1" / "student", "eager", last=5)  # stopped before its last step
    _stage(qb / "t1200-s2" / "teacher", "gemm")
    _stage(qb / "t1200-s2" / "student", "gemm")
    _stage(qb / "t1200-s4" / "teacher", "eager", autocast="bf16")  # accel auto's choice on a bf16 CPU
    _stage(qb / "t1200-s4" / "student", "eager", autocast="bf16")
    _stage(qb / "t1200-s5" / "teacher", "eager", autocast="fp32")
    _stage(qb / "t1200-s5" / "student", "eager", autocast="fp32")
    assert tf.run_dir_for("eager", 0) == qb / "t1200-s0"
    assert tf.run_dir_for("eager", 4) == tf.runs_root() / "eager-s4"  # bf16: not the fp32 form "eager"
    assert tf.run_dir_for("eager-bf16", 4) == tf.runs_root() / "eager-bf16-s4"
    assert tf.run_dir_for("eager", 5) == qb / "t1200-s5"
    assert tf.run_dir_for("eager", 1) == tf.runs_root() / "eager-s1"
    assert tf.run_dir_for("eager", 2) == tf.runs_root() / "eager-s2"
    assert tf.run_dir_for("nhwc", 0) == tf.runs_root() / "nhwc-s0"
    assert tf.run_dir_for("eager", 3) == tf.runs_root() / "eager-s3"  # nothing there


def test_a_form_names_its_accel_and_its_autocast():
    assert tf.form_settings("eager") == {"accel": "eager", "autocast": "fp32"}
    assert tf.form_settings("nhwc-bf16") == {"accel": "nhwc", "autocast": "bf16"}


def test_a_form_is_measured_against_the_reference_run_of_its_seed(tmp_path, monkeypatch):
    import torch

    from ractd.io import atomic_parquet

    monkeypatch.setenv("RACTD_CACHE_DIR", str(tmp_path))
    for form, shift, scores in (("eager", 0.0, [1.0, 2.0, 3.0]), ("nhwc", 1e-6, [1.0, 2.5, 3.0])):
        run = tf.runs_root() / f"{form}-s0"
        for stage in ("teacher", "student"):
            (run / stage).mkdir(parents=True)
            torch.save({"model": {"w": torch.zeros(3) + shift * (stage == "student"), "b": torch.ones(2)}},
                       run / stage / "best.pt")
        for policy in tf.POLICIES:
            atomic_parquet(run / f"eval-{policy}.parquet", [{"seed": i, "normalized_score": s}
                                                            for i, s in enumerate(scores)])
    rows = [_row("nhwc", 0, 2.2, policy=p) for p in tf.POLICIES]
    got = tf.against_reference(rows, "nhwc", "eager", 0)
    assert [r["episodes_differing"] for r in got] == [1, 1] and all(r["reference"] == "eager" for r in got)
    assert got[0]["teacher_max_weight_diff"] == 0.0 and np.isclose(got[0]["student_max_weight_diff"], 1e-6)
    text = "\n".join(tf.report_lines([_row("eager", 0, 2.0, policy=p) for p in tf.POLICIES] + got))
    assert "nhwc against eager, seed 0: largest |weight difference| teacher 0.0e+00, student 1.0e-06" in text
    assert "heun 1 of 100, student 1 of 100" in text


def test_the_results_section_renders_the_bf16_store_beside_the_accel_forms(tmp_path):
    from ractd.io import atomic_parquet

    atomic_parquet(tmp_path / "training_forms" / "results.parquet",
                   [_row("eager", s, 120.0 + s) for s in range(3)] + [_row("nhwc", s, 121.0 + s) for s in range(3)])
    bf16 = [{**_row("eager", s, 118.0 + s), "cpu": "AMD EPYC"} for s in range(3)] + \
        [{**_row("eager-bf16", s, 60.0 + s), "cpu": "AMD EPYC"} for s in range(3)]
    atomic_parquet(tmp_path / "training_forms" / "bf16" / "results.parquet", bf16)
    text = "\n".join(tf.section(tmp_path))
    assert "student, nhwc vs eager on seeds [0, 1, 2]" in text
    head, tail = text.split("#### fp32 against bf16 autocast")
    assert "on AMD EPYC" in tail and "eager-bf16 vs eager on seeds [0, 1, 2]: mean of seeds 61.0 vs 119.0" in tail
    assert "eager-bf16" not in head
