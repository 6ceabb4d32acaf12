"""The training loop's guards: CLI defaults = dataclass defaults, EMA warm-up, config validation, non-finite
stops, provenance of upstream checkpoints, resume rules, reports on every rank."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from ractd import RactdError, ctm
from ractd.cli import TRAIN_COMMANDS, build_parser, eval_config, main, train_config
from ractd.data.generate_maze import generate_maze
from ractd.evaluate import EvalConfig
from ractd.train import (
    BUDGETS,
    RunContext,
    TrainConfig,
    ema_decay_at,
    ema_update,
    train,
)

TINY = dict(task="maze2d-umaze", scale="tiny", preset="tiny", batch=8, report_every=5)


def _parse(argv):
    return build_parser().parse_args(argv)


@pytest.mark.parametrize("command", list(TRAIN_COMMANDS))
@pytest.mark.parametrize("budget", ["cpu", "quick", "paper"])
def test_every_training_command_defaults_equal_the_dataclass(command, budget):
    stage = TRAIN_COMMANDS[command][0]
    argv = [command, "--task", "hopper-medium"] + ({"cpu": [], "quick": ["--quick"], "paper": ["--paper"]}[budget])
    expected = TrainConfig.for_stage(stage, budget, task="hopper-medium")
    assert train_config(_parse(argv), stage) == expected
    # and the budget table only holds fields of the dataclass
    assert set(BUDGETS[budget][stage]) <= {f.name for f in dataclasses.fields(TrainConfig)}


def test_evaluate_defaults_equal_the_dataclass_and_flags_reach_every_field():
    assert eval_config(_parse(["evaluate", "--task", "maze2d-umaze"])) == EvalConfig(task="maze2d-umaze")
    # every field of the configs has a flag, and a given flag lands in its field (nested ones too)
    cfg = train_config(_parse(["distill", "--task", "hopper-medium", "--sigma", "0.3", "--dsm-form", "jump",
                               "--no-init-scaled", "--distill-distance", "elementwise", "--reward-hidden", "8", "16",
                               "--steps", "7"]), "student")
    assert cfg.distill.sigma == 0.3 and cfg.distill.dsm_form == "jump" and not cfg.distill.init_scaled
    assert cfg.distill.distance == "elementwise" and cfg.distance == "per_sample" and cfg.weighting == "none"
    assert cfg.reward_hidden == (8, 16) and cfg.steps == 7 and cfg.ckpt_every == 7
    from ractd.cli import STAGE_ONLY

    for command, (stage, _) in TRAIN_COMMANDS.items():
        dests = {a.dest for a in build_parser()._subparsers._group_actions[0].choices[command]._actions}
        fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"stage", "distill"}
        if stage == "student":
            fields |= {f"distill.{f.name}" for f in dataclasses.fields(ctm.DistillConfig)}
        fields -= {k for k, stages in STAGE_ONLY.items() if stage not in stages}
        assert fields <= dests, command


def test_pipeline_distills_with_the_dataclass_dsm_form():
    """The defect that made the first command score -11: pipeline restated a DSM form by hand (then 'jump' under
    lambda) instead of taking the dataclass's."""
    args = _parse(["pipeline", "--task", "maze2d-umaze", "--quick"])
    cfg = train_config(args, "student")
    assert cfg == TrainConfig.for_stage("student", "quick", task="maze2d-umaze")
    default = ctm.DistillConfig()
    assert (cfg.distill.dsm_form, cfg.distill.dsm_weighting) == (default.dsm_form, default.dsm_weighting)


def test_ema_warmup_is_dominated_by_trained_weights():
    """A parameter leaves its initial value 0 for 1 at the first step and stays there: the EMA's remaining weight
    on the initialisation is the product of the decays. With warm-up it is negligible after 100 steps; a constant
    0.999 decay (the defect) would still hold 90% of the initialisation."""
    model, ema = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    ema.weight.data.zero_()
    with torch.no_grad():
        model.weight.fill_(1.0)
    for k in range(1, 101):
        ema_update(ema, model, ema_decay_at(k, 0.999, 0.75))
    init_weight = 1.0 - float(ema.weight.detach())
    expected = math.prod(ema_decay_at(k, 0.999, 0.75) for k in range(1, 101))
    np.testing.assert_allclose(init_weight, expected, rtol=1e-4, atol=1e-7)
    assert init_weight < 0.01
    assert ema_decay_at(1, 0.999, 0.75) == 0.0 and ema_decay_at(10**7, 0.999, 0.75) == 0.999


@pytest.mark.parametrize("field, value, words", [
    ("batch", 0, "batch=0"), ("steps", -1, "steps=-1"), ("lr", float("nan"), "lr=nan"),
    ("ema_decay", 1.0, "ema_decay=1.0"), ("scale", "huge", "scale='huge'"), ("rtg", "x", "rtg='x'"),
    ("holdout", 1.0, "holdout=1.0"), ("data_fraction", 0.0, "data_fraction=0.0"),
])
def test_bad_config_values_fail_up_front_with_one_line(field, value, words):
    with pytest.raises(RactdError, match=words.replace("(", r"\(").replace(".", r"\.")) as e:
        TrainConfig(**{**TINY, field: value}).resolved()
    assert "\n" not in str(e.value)


def test_bad_cli_values_exit_2_with_one_line(capsys):
    for argv in (["train-teacher", "--task", "maze2d-umaze", "--batch", "0", "--quiet"],
                 ["evaluate", "--task", "maze2d-umaze", "--seeds", "0"],
                 ["distill", "--task", "maze2d-umaze", "--dsm-form", "nope"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err, err


@pytest.fixture
def maze_tiny():
    generate_maze("maze2d-umaze", scale="tiny", seed=0, progress=False)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(maze_tiny, tmp_path):
    cfg = TrainConfig(**TINY, stage="teacher", run_dir=str(tmp_path / "r"), steps=20, ckpt_every=5)

    def poison(step):  # after step 7 the weights become NaN: the next loss is non-finite
        if step == 7:
            with torch.no_grad():
                next(model_params()).fill_(float("nan"))

    holder = {}
    import ractd.train as T

    orig = T.BUILDERS["teacher"]

    def build(cfg_, prep):
        holder["m"] = orig(cfg_, prep)
        return holder["m"]

    def model_params():
        return holder["m"].parameters()

    T.BUILDERS["teacher"] = build
    try:
        with pytest.raises(RactdError, match="non-finite .* at step 8; stopped, the last good checkpoint") as e:
            train(cfg, RunContext(progress=False, on_step=poison))
    finally:
        T.BUILDERS["teacher"] = orig
    assert "\n" not in str(e.value)
    ck = torch.load(tmp_path / "r" / "teacher" / "latest" / "checkpoint.pt", weights_only=False)
    assert ck["step"] == 5 and all(torch.isfinite(v).all() for v in ck["model"].values())
    best = torch.load(tmp_path / "r" / "teacher" / "best.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in best["model"].values())
    for line in (tmp_path / "r" / "teacher" / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))


def test_distillation_refuses_upstream_of_another_dataset(tmp_path):
    generate_maze("maze2d-umaze", scale="tiny", seed=0, progress=False)
    run = str(tmp_path / "r")
    train(TrainConfig(**TINY, stage="teacher", run_dir=run, steps=2), RunContext(progress=False))
    # the same task generated with another seed: same shapes, another dataset
    generate_maze("maze2d-umaze", scale="tiny", seed=1, progress=False)
    with pytest.raises(RactdError, match=r"teacher/best.pt was trained on dataset \w+, this run's dataset is \w+"):
        train(TrainConfig(**TINY, stage="student", run_dir=run, steps=2), RunContext(progress=False))
    # and resuming the teacher on the changed dataset is refused too
    with pytest.raises(RactdError, match="trained on dataset .* the dataset now is"):
        train(TrainConfig(**TINY, stage="teacher", run_dir=run, steps=4), RunContext(progress=False))


def test_distillation_refuses_a_teacher_of_another_task(maze_tiny, tmp_path):
    from ractd.data.generate_maze import generate_maze as gen

    gen("maze2d-umaze", scale="tiny", seed=0, progress=False)
    run = tmp_path / "r"
    out = train(TrainConfig(**TINY, stage="teacher", run_dir=str(run), steps=2), RunContext(progress=False))
    ck = torch.load(out["best"], weights_only=False)
    ck["config"]["task"] = "maze2d-medium"  # same shapes (4-dim states), another task
    torch.save(ck, tmp_path / "other.pt")
    with pytest.raises(RactdError, match="trained on task maze2d-medium, this run is maze2d-umaze"):
        train(TrainConfig(**TINY, stage="student", run_dir=str(run), steps=2, teacher_ckpt=str(tmp_path / "other.pt")),
              RunContext(progress=False))


def test_resume_allows_more_steps_and_another_folder(maze_tiny, tmp_path):
    kw = dict(**TINY, stage="teacher", ckpt_every=5)
    a = train(TrainConfig(**kw, run_dir=str(tmp_path / "a"), steps=5), RunContext(progress=False))
    at5 = tmp_path / "at5.pt"
    at5.write_bytes(a["checkpoint"].read_bytes())
    # extend the same run
    b = train(TrainConfig(**kw, run_dir=str(tmp_path / "a"), steps=10), RunContext(progress=False))
    assert b["step"] == 10
    # a restored run in another folder (as a restarted Ray trial): resume from the given checkpoint file
    reports = []
    c = train(TrainConfig(**kw, run_dir=str(tmp_path / "c"), steps=10),
              RunContext(progress=False, resume_from=at5, report=lambda m, d: reports.append(m["step"])))
    assert c["step"] == 10 and reports == [10]
    with pytest.raises(RactdError, match=r"different config \(lr\)"):
        train(TrainConfig(**{**kw, "lr": 1e-2}, run_dir=str(tmp_path / "a"), steps=12), RunContext(progress=False))


def test_reports_on_every_rank_and_checkpoint_dir_holds_only_the_latest(maze_tiny, tmp_path):
    """Two simulated ranks in one process (no collectives): both call report the same number of times; only
    rank 0 gets a checkpoint folder, and it holds the latest checkpoint, not best.pt."""
    calls = {0: [], 1: []}
    for rank in (0, 1):
        cfg = TrainConfig(**TINY, stage="teacher", run_dir=str(tmp_path / f"r{rank}"), steps=10, ckpt_every=5)
        train(cfg, RunContext(progress=False, rank=rank, world_size=2,
                              report=lambda m, d, rank=rank: calls[rank].append((m["step"], m["at_checkpoint"], d))))
    assert [(s, c) for s, c, _ in calls[0]] == [(s, c) for s, c, _ in calls[1]] == [(5, True), (10, True)]
    assert all(d is None for _, _, d in calls[1])
    dirs = [d for _, _, d in calls[0]]
    assert all(d is not None and sorted(p.name for p in d.iterdir()) == ["checkpoint.pt", "config.json"] for d in dirs)


def test_distill_diagnostics_measure_bound_range_and_reward_gap():
    """A student that always answers 2.0 (outside the data range) and R(s, a) = sum(a): every element is at
    the bound, 1.0 outside the range, and R of its clamped action is act_dim against the data's own."""
    from ractd.tasks import get_task
    from ractd.train import Prepared, distill_diagnostics

    class Constant(torch.nn.Module):
        sigma_min = 0.02

        def forward(self, x, t, s, cond=None):
            return torch.full_like(x, 2.0)

    rng = np.random.default_rng(0)
    action = rng.uniform(-1, 1, (64, 3)).astype(np.float32)
    prep = Prepared(get_task("hopper-medium"), np.zeros((64, 16, 3), np.float32), np.zeros((64, 11), np.float32), {},
                    state=np.zeros((64, 11), np.float32), action=action)
    reward = lambda s, a: a.sum(-1)
    d = distill_diagnostics(TrainConfig(), Constant(), reward, prep, "cpu", n=64)
    assert d["at_bound"] == 1.0
    np.testing.assert_allclose(d["out_of_range"], 1.0)
    np.testing.assert_allclose(d["r_student"], 3.0)
    g = torch.Generator().manual_seed(12345)
    idx = torch.randint(0, 64, (64,), generator=g).numpy()
    np.testing.assert_allclose(d["r_data"], action[idx].sum(-1).mean(), rtol=1e-5)
    np.testing.assert_allclose(d["r_gap"], 3.0 - action[idx].sum(-1).mean(), rtol=1e-5)


def test_balanced_student_keeps_its_term_magnitudes_and_older_checkpoints_resume(maze_tiny, tmp_path):
    """term_scale "balanced": the running magnitudes travel in the checkpoint and come back on resume; a
    checkpoint written before the field existed (its distill config lacks it) resumes as "raw", its default,
    and is refused as "balanced"."""
    run = tmp_path / "r"
    train(TrainConfig(**TINY, stage="teacher", run_dir=str(run), steps=2), RunContext(progress=False))
    bal = TrainConfig(**TINY, stage="student", run_dir=str(run), steps=2, ckpt_every=2,
                      distill=ctm.DistillConfig(term_scale="balanced"))
    out = train(bal, RunContext(progress=False))
    mags = torch.load(out["checkpoint"], weights_only=False)["term_balance"]["magnitude"]
    assert set(mags) == {"ctm", "dsm"} and all(v > 0 for v in mags.values())
    train(dataclasses.replace(bal, steps=4), RunContext(progress=False))  # resumes with them
    mags4 = torch.load(out["checkpoint"], weights_only=False)["term_balance"]["magnitude"]
    assert mags4 != mags

    raw = TrainConfig(**TINY, stage="student", run_dir=str(tmp_path / "old"), steps=2, ckpt_every=2,
                      teacher_ckpt=str(run / "teacher" / "best.pt"))
    old = train(raw, RunContext(progress=False))["checkpoint"]
    ck = torch.load(old, weights_only=False)
    for k in ("term_scale", "term_decay"):
        del ck["config"]["distill"][k]
    torch.save(ck, old)
    assert train(dataclasses.replace(raw, steps=4), RunContext(progress=False))["step"] == 4
    with pytest.raises(RactdError, match=r"different config \(distill\)"):
        train(dataclasses.replace(raw, steps=6, distill=ctm.DistillConfig(term_scale="balanced")),
              RunContext(progress=False))


def test_term_gradient_norms_follow_the_weights_training_applies(maze_tiny, tmp_path):
    """Same seeded batches every call: the norms scale exactly with alpha and beta, "balanced" divides them by the
    running magnitudes, and the frozen student comes back frozen."""
    from ractd.train import (
        load_stage_model,
        load_upstream,
        prepare,
        term_gradient_norms,
    )

    run = tmp_path / "r"
    train(TrainConfig(**TINY, stage="teacher", run_dir=str(run), steps=2), RunContext(progress=False))
    out = train(TrainConfig(**TINY, stage="student", run_dir=str(run), steps=2, ckpt_every=2),
                RunContext(progress=False))
    student, cfg, _ = load_stage_model(out["checkpoint"], use_ema=False)
    prep = prepare(cfg)
    teacher, _ = load_upstream(run / "teacher" / "best.pt", "teacher", cfg, prep)
    dev = torch.device("cpu")

    def norms(**distill):
        c = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, **distill))
        bal = ctm.TermBalance()
        bal.magnitude = {"ctm": 2.0, "dsm": 4.0}
        return term_gradient_norms(c, student, teacher, None, prep, dev, bal)

    base = norms(alpha=1.0, beta=1.0)
    assert base["g_ctm"] > 0 and base["g_dsm"] > 0 and "g_reward" not in base  # maze2d: no reward model
    scaled = norms(alpha=3.0, beta=0.5)
    np.testing.assert_allclose([scaled["g_ctm"], scaled["g_dsm"]], [3 * base["g_ctm"], 0.5 * base["g_dsm"]],
                               rtol=1e-5)
    bal = norms(alpha=1.0, beta=1.0, term_scale="balanced")
    np.testing.assert_allclose([bal["g_ctm"], bal["g_dsm"]], [base["g_ctm"] / 2, base["g_dsm"] / 4], rtol=1e-5)
    assert not any(p.requires_grad for p in student.parameters())
    with pytest.raises(ValueError, match="TermBalance"):
        term_gradient_norms(dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, term_scale="gradient")),
                            student, teacher, None, prep, dev, None)


# ------------------------------------------------------------------------ held-out episodes (TrainConfig.holdout)

def _split_before_holdout(cfg, prep):
    """ractd.train._split as it was before TrainConfig.holdout, verbatim but for taking the Prepared."""
    n = len(prep.cond)
    if cfg.stage == "reward":
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed)).numpy()
        n_val = max(1, int(cfg.val_fraction * n))
        val_idx, train_idx = perm[:n_val], perm[n_val:]
    else:
        train_idx, val_idx = np.arange(n), None
    return train_idx, val_idx


def _val_before_holdout(cfg, model, ema, teacher, prep, val_idx, held, device):
    """The checkpoint's validation before TrainConfig.holdout: the reward model's MSE (train._reward_val_loss)."""
    from ractd.data.prepared import to_torch

    assert cfg.stage == "reward" and held is None
    with torch.no_grad():
        pred = model(to_torch(prep.state, val_idx, device), to_torch(prep.action, val_idx, device))
        return {"val_loss": float((pred - to_torch(prep.rtg, val_idx, device)).pow(2).sum()) / len(val_idx)}


def _run_files(run_dir, stage):
    ck = torch.load(run_dir / stage / "latest" / "checkpoint.pt", weights_only=False)
    best = torch.load(run_dir / stage / "best.pt", weights_only=False)
    lines = [json.loads(x) for x in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]
    for m in lines:
        m.pop("steps_per_s")
    return ck, best, lines


def _assert_same_run(a, b):
    (ck_a, best_a, lines_a), (ck_b, best_b, lines_b) = a, b
    assert lines_a == lines_b
    for part in ("model", "ema"):
        for x, y in ((ck_a, ck_b), (best_a, best_b)):
            if x[part] is None:
                assert y[part] is None
                continue
            for k in x[part]:
                torch.testing.assert_close(x[part][k], y[part][k], rtol=0, atol=0, msg=k)
    for k in ("data", "torch"):
        torch.testing.assert_close(ck_a["rng"][k], ck_b["rng"][k], rtol=0, atol=0)


def test_holdout_zero_trains_exactly_as_the_code_before_it(tmp_path, monkeypatch):
    """holdout 0 (the default): the training rows, the random streams, the weights, best.pt and the metrics are
    those of the split and validation the loop had before the option (reward model included), bit for bit."""
    import ractd.train as T
    from ractd import holdout
    from ractd.data.generate_random import random_locomotion_dataset

    random_locomotion_dataset("hopper-medium-replay", 600, 0, cut_prob=0.01)
    kw = dict(task="hopper-medium-replay", scale="tiny", preset="tiny", batch=8, report_every=3, steps=6,
              ckpt_every=3, accel="eager", autocast="fp32", select_seeds=0)
    stages = ("reward", "teacher", "student", "bc")
    for stage in stages:
        train(TrainConfig(**kw, stage=stage, run_dir=str(tmp_path / "new")), RunContext(progress=False))
    with monkeypatch.context() as m:
        m.setattr(T, "_split", _split_before_holdout)
        m.setattr(holdout, "val_losses", _val_before_holdout)
        m.setattr(holdout, "fixed_draws", lambda *a, **k: pytest.fail("no held-out draws"))
        for stage in stages:
            train(TrainConfig(**kw, stage=stage, run_dir=str(tmp_path / "old")), RunContext(progress=False))
    for stage in stages:
        _assert_same_run(_run_files(tmp_path / "new", stage), _run_files(tmp_path / "old", stage))
    run = T._setup(TrainConfig(**kw, stage="teacher", run_dir=str(tmp_path / "new")).resolved(),
                   RunContext(progress=False), None, None)
    np.testing.assert_array_equal(run.train_idx, np.arange(len(run.prep.cond)))
    assert run.val_idx is None and run.heldout is None


def test_heldout_losses_are_logged_and_leave_the_training_steps_as_they_are(maze_tiny, tmp_path, monkeypatch):
    """With held-out episodes every checkpoint logs the stage's held-out losses, and measuring them changes
    nothing of the training (a run whose measurement is skipped trains the same weights); the config records the
    option, and a checkpoint written before the option existed resumes as holdout 0."""
    from ractd import holdout

    kw = dict(**TINY, steps=4, ckpt_every=2, accel="eager", autocast="fp32", holdout=0.3, holdout_windows=32,
              select_seeds=0)
    expected = {"teacher": {"val_loss", "val_loss_raw"}, "ddpm": {"val_loss", "val_loss_raw"},
                "student": {"val_loss", "val_ctm", "val_dsm"}, "bc": {"val_loss"}}
    for stage, keys in expected.items():
        train(TrainConfig(**kw, stage=stage, run_dir=str(tmp_path / "m")), RunContext(progress=False))
        _, _, lines = _run_files(tmp_path / "m", stage)
        assert [m["step"] for m in lines] == [2, 4]
        assert all(keys <= set(m) and all(math.isfinite(m[k]) for k in keys) for m in lines), (stage, lines)
        assert json.loads((tmp_path / "m" / stage / "config.json").read_text())["holdout"] == 0.3
    with monkeypatch.context() as m:
        m.setattr(holdout, "val_losses", lambda *a, **k: {})
        train(TrainConfig(**kw, stage="teacher", run_dir=str(tmp_path / "skip")), RunContext(progress=False))
    a, b = _run_files(tmp_path / "m", "teacher"), _run_files(tmp_path / "skip", "teacher")
    for k in a[0]["model"]:
        torch.testing.assert_close(a[0]["model"][k], b[0]["model"][k], rtol=0, atol=0)
    torch.testing.assert_close(a[0]["rng"]["torch"], b[0]["rng"]["torch"], rtol=0, atol=0)
    old = TrainConfig(**{**kw, "holdout": 0.0}, stage="teacher", run_dir=str(tmp_path / "old"))
    path = train(old, RunContext(progress=False))["checkpoint"]
    ck = torch.load(path, weights_only=False)
    del ck["config"]["holdout"], ck["config"]["data_fraction"]
    torch.save(ck, path)
    assert train(dataclasses.replace(old, steps=6), RunContext(progress=False))["step"] == 6
    with pytest.raises(RactdError, match=r"different config \(holdout\)"):
        train(dataclasses.replace(old, steps=8, holdout=0.3), RunContext(progress=False))


def test_the_reward_model_validates_on_heldout_episodes(tmp_path):
    import ractd.train as T
    from ractd import holdout
    from ractd.data.generate_random import random_locomotion_dataset

    random_locomotion_dataset("hopper-medium-replay", 600, 0, cut_prob=0.01)
    cfg = TrainConfig(task="hopper-medium-replay", scale="tiny", stage="reward", holdout=0.2)
    prep = T.prepare(cfg)
    train_idx, val_idx = T._split(cfg, prep)
    want = holdout.split(cfg, prep)
    np.testing.assert_array_equal(train_idx, want[0])
    np.testing.assert_array_equal(val_idx, want[1])
    assert not set(prep.episode[train_idx]) & set(prep.episode[val_idx])
