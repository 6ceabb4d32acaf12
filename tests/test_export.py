"""Exported one-step student (ractd.export): same actions as the PyTorch policy on the same noise, runs
without ractd, rolls out like the PyTorch policy; bf16 is an explicit, off-by-default option."""

import json
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch

from ractd import RactdError, ctm
from ractd.config import UNET_PRESETS
from ractd.data.windows import Normalizer
from ractd.export import (
    ExportedPolicy,
    build_policy_graph,
    export_checkpoint,
    export_graph,
    main,
)
from ractd.nets.unet1d import ConditionalUnet1D, to_precision
from ractd.policy import MazePlanner, rowwise_randn, student_sampler

TASK = "hopper-medium-replay"
TOL = 1e-4  # fp32: exported vs PyTorch actions on the same noise


def _random_hopper_dataset(n_steps=600, seed=0):
    """A small D4RL-format dataset from random actions in Hopper-v5."""
    from ractd.data.generate_random import random_locomotion_dataset

    return random_locomotion_dataset(TASK, n_steps, seed)


@pytest.fixture(scope="module")
def student_ckpt(tmp_path_factory):
    """A tiny one-step student checkpoint (teacher 4 steps, student 4 steps, obs history 2), made once."""
    from ractd.train import RunContext, TrainConfig, train

    root = tmp_path_factory.mktemp("export")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RACTD_CACHE_DIR", str(root / "cache"))
        _random_hopper_dataset()
        kw = dict(task=TASK, scale="tiny", preset="tiny", steps=4, batch=8, ckpt_every=4, report_every=4,
                  run_dir=str(root / "run"), obs_history=2)
        torch.manual_seed(0)
        train(TrainConfig(stage="teacher", **kw), RunContext(progress=False))
        out = train(TrainConfig(stage="student", distill=ctm.DistillConfig(alpha=-1.0, beta=-1.0, sigma=0.0),
                                select_seeds=0, **kw),
                    RunContext(progress=False))
    return out["checkpoint"]


def _torch_policy(ckpt):
    from ractd.evaluate import policy_from_checkpoint
    from ractd.train import load_stage_model

    _, cfg, _ = load_stage_model(ckpt)
    policy, task, _ = policy_from_checkpoint(ckpt, "student", 1, init_scaled=cfg.distill.init_scaled,
                                           precision="fp32")  # the export is fp32
    return policy, task


def _gens(n, offset=0):
    return [torch.Generator().manual_seed(offset + i) for i in range(n)]


def _dataset_like_obs(n, seed=1):
    env = gym.make("Hopper-v5")
    obs = [env.reset(seed=seed + i)[0] for i in range(n)]
    return np.asarray(obs, np.float32)


@pytest.mark.parametrize("fmt,engine", [("onnx", "openvino"), ("onnx", "onnxruntime"), ("torchscript", "torch")])
def test_exported_policy_equals_pytorch_policy_on_the_same_noise(student_ckpt, tmp_path, fmt, engine):
    path = export_checkpoint(student_ckpt, tmp_path / f"policy.{fmt}", fmt)
    exported = ExportedPolicy(path, engine=engine, threads=1)
    assert exported.engine == engine and exported.precision == "fp32" and exported.k == 2
    policy, _ = _torch_policy(student_ckpt)
    B = 7
    obs0, obs1 = _dataset_like_obs(B), _dataset_like_obs(B, seed=50)
    policy.reset(B)
    policy.act_chunk(obs0, _gens(B))                # history: [obs0, obs0] then [obs0, obs1]
    ref = policy.act_chunk(obs1, _gens(B, 100))
    noise = rowwise_randn(_gens(B, 100), (exported.horizon, exported.dim)).numpy()
    out = exported.act(np.stack([obs0, obs1], axis=1), noise)
    assert out.shape == ref.shape == (B, 16, 3)
    np.testing.assert_allclose(out, ref, atol=TOL, rtol=0)
    assert np.abs(ref).max() > 0.05  # not a degenerate all-zero policy
    # the noise input is used: other noise, other actions
    assert np.abs(exported.act(np.stack([obs0, obs1], axis=1), -noise) - out).max() > 1e-3


def test_export_scales_the_noise_only_when_the_checkpoint_did(tmp_path):
    torch.manual_seed(0)
    student = ctm.Student(ConditionalUnet1D(3, 11, UNET_PRESETS["tiny"], n_times=2)).eval()
    on, an = Normalizer(-np.ones(11), np.ones(11)), Normalizer(-np.ones(3), np.ones(3))
    meta = {"task": TASK, "kind": "locomotion", "k": 1, "obs_dim": 11, "horizon": 16, "dim": 3}
    obs = np.random.default_rng(0).uniform(-1, 1, (4, 11)).astype(np.float32)
    noise = rowwise_randn(_gens(4), (16, 3)).numpy()
    for init_scaled in (True, False):
        path = export_graph(build_policy_graph(student, on, an, init_scaled), meta, tmp_path / f"{init_scaled}.onnx")
        x_T = torch.from_numpy(noise) * (80.0 if init_scaled else 1.0)
        with torch.no_grad():
            ref = ctm.sample_student(student, x_T, torch.from_numpy(obs)).numpy()
        np.testing.assert_allclose(ExportedPolicy(path, threads=1).act(obs, noise), ref, atol=TOL, rtol=0)


def test_exported_file_runs_without_ractd(student_ckpt, tmp_path):
    onnx_path = export_checkpoint(student_ckpt, tmp_path / "p.onnx", "onnx")
    ts_path = export_checkpoint(student_ckpt, tmp_path / "p.ts", "torchscript")
    ex = ExportedPolicy(onnx_path, threads=1)
    obs = np.stack([_dataset_like_obs(3)] * 2, axis=1)
    noise = rowwise_randn(_gens(3), (16, 3)).numpy()
    np.save(tmp_path / "obs.npy", obs)
    np.save(tmp_path / "noise.npy", noise)
    script = f"""
import sys, json
sys.modules["ractd"] = None  # any import of ractd fails
import numpy as np, onnxruntime as ort, torch
obs, noise = np.load({str(tmp_path / 'obs.npy')!r}), np.load({str(tmp_path / 'noise.npy')!r})
a = ort.InferenceSession({str(onnx_path)!r}, providers=["CPUExecutionProvider"]).run(None, {{"obs": obs, "noise": noise}})[0]
b = torch.jit.load({str(ts_path)!r})(torch.from_numpy(obs), torch.from_numpy(noise)).numpy()
print(json.dumps([a.tolist(), b.tolist()]))
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    a, b = (np.asarray(v) for v in json.loads(res.stdout.strip().splitlines()[-1]))
    ref = ex.act(obs, noise)
    np.testing.assert_allclose(a, ref, atol=TOL, rtol=0)
    np.testing.assert_allclose(b, ref, atol=TOL, rtol=0)


def test_exported_rollouts_match_pytorch_rollouts(student_ckpt, tmp_path):
    from ractd.rollout import rollout_locomotion

    policy, task = _torch_policy(student_ckpt)
    seeds = [3, 4, 5]
    ref = rollout_locomotion(task, policy, seeds, max_steps=25, progress=False)
    exported = ExportedPolicy(export_checkpoint(student_ckpt, tmp_path / "p.onnx"), threads=1)
    got = rollout_locomotion(task, exported.rollout_policy(), seeds, max_steps=25, progress=False)
    assert [r["seed"] for r in got] == seeds
    assert [r["length"] for r in got] == [r["length"] for r in ref]
    np.testing.assert_allclose([r["return"] for r in got], [r["return"] for r in ref], rtol=1e-4)


def test_maze_planner_export_equals_pytorch_planner(tmp_path):
    torch.manual_seed(0)
    student = ctm.Student(ConditionalUnet1D(4, 8, UNET_PRESETS["tiny"], n_times=2)).eval()
    on = Normalizer([0.5, 0.5, -5, -5], [3.5, 3.5, 5, 5])
    meta = {"task": "maze2d-umaze", "kind": "maze", "k": 2, "obs_dim": 4, "horizon": 16, "dim": 4}
    path = export_graph(build_policy_graph(student, on, on, True), meta, tmp_path / "maze.onnx")
    planner = MazePlanner(student_sampler(student, (16, 4)), on, horizon=16)
    start = np.random.default_rng(0).uniform([1, 1, -1, -1], [3, 3, 1, 1], (5, 4)).astype(np.float32)
    goal = np.tile([[3.0, 1.0]], (5, 1))
    ref = planner.plan(start, goal, _gens(5))
    got = ExportedPolicy(path, threads=1).rollout_policy().plan(start, goal, _gens(5))
    np.testing.assert_allclose(got, ref, atol=1e-4 * np.abs(ref).max(), rtol=0)


def test_bf16_is_explicit_and_off_by_default(student_ckpt, tmp_path):
    policy, _ = _torch_policy(student_ckpt)
    onnx_path = export_checkpoint(student_ckpt, tmp_path / "p.onnx")
    assert ExportedPolicy(onnx_path).precision == "fp32"
    obs = np.stack([_dataset_like_obs(4)] * 2, axis=1)
    noise = rowwise_randn(_gens(4), (16, 3)).numpy()
    fp32 = ExportedPolicy(onnx_path, engine="openvino", threads=1).act(obs, noise)
    bf16 = ExportedPolicy(onnx_path, engine="openvino", precision="bf16", threads=1).act(obs, noise)
    ts = ExportedPolicy(export_checkpoint(student_ckpt, tmp_path / "p.ts", "torchscript", precision="bf16"))
    assert ts.precision == "bf16"
    ts_bf16 = ts.act(obs, noise)
    for out in (bf16, ts_bf16):  # runs, finite, close to fp32 but not bit-identical (it really is bf16)
        assert np.isfinite(out).all()
        assert 0 < np.abs(out - fp32).max() < 0.1 * np.abs(fp32).max()
    with pytest.raises(RactdError, match="fp32 only"):
        ExportedPolicy(onnx_path, engine="onnxruntime", precision="bf16")

    # PyTorch: to_precision casts the U-Net only; the sampler still takes and returns float32
    from ractd.train import load_stage_model

    student, _, _ = load_stage_model(student_ckpt)
    assert next(student.parameters()).dtype == torch.float32  # fp32 unless asked
    x_T = torch.from_numpy(noise) * 80.0
    cond = torch.from_numpy(np.zeros((4, student.net.global_cond_dim), np.float32))
    with torch.no_grad():
        ref = ctm.sample_student(student, x_T, cond)
        to_precision(student, "bf16")
        assert next(student.parameters()).dtype == torch.bfloat16
        low = student_sampler(student, (16, 3))(cond, _gens(4))
    assert low.dtype == torch.float32
    assert 0 < (low - ref).abs().max() < 0.1
    with pytest.raises(RactdError, match="unknown precision"):
        to_precision(student, "fp8")


def test_bf16_unet_keeps_the_time_features_accurate():
    """bf16 rounds 250 ln(80) ~ 1096 to a multiple of 8: sin/cos of the time features must stay float32
    (bf16 relative precision 2^-8 gives errors of ~1% of the output; wrong phases give tens of %)."""
    torch.manual_seed(0)
    net = ConditionalUnet1D(3, 11, UNET_PRESETS["tiny"], n_times=2).eval()
    low = to_precision(ConditionalUnet1D(3, 11, UNET_PRESETS["tiny"], n_times=2).eval(), "bf16")
    low.load_state_dict(net.state_dict())
    B = 64
    x, c = torch.randn(B, 16, 3), torch.randn(B, 11)
    times = (torch.full((B,), 250 * np.log(80.0)), torch.full((B,), 250 * np.log(0.02)))
    with torch.no_grad():
        ref, out = net(x, times, c), low(x, times, c)
        emb, emb_low = net.time_embed(times[0]), low.time_embed(times[0]).float()
    assert out.dtype == torch.float32 and low.final[1].weight.dtype == torch.bfloat16
    assert (emb_low - emb).abs().max() < 0.03 * emb.abs().max()
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_cli_writes_the_file_and_bad_input_is_one_line_exit_2(student_ckpt, tmp_path, capsys):
    out = tmp_path / "cli.onnx"
    assert main(["--checkpoint", str(student_ckpt), "--format", "onnx", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    meta = ExportedPolicy(out).meta
    assert meta["task"] == TASK and meta["k"] == 2 and meta["init_scaled"] is True
    assert main(["--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: checkpoint not found") and "\n" not in err
    teacher = str(student_ckpt).replace("student", "teacher")
    assert main(["--checkpoint", teacher, "--out", str(tmp_path / "t.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs a student checkpoint" in err and "\n" not in err
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(student_ckpt), "--format", "tflite"])
    assert e.value.code == 2
    with pytest.raises(RactdError, match="not found"):
        ExportedPolicy(tmp_path / "nope.onnx")
