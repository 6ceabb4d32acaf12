"""Ray Train adapter (ractd_ray.train) on a real local Ray: gradient all-reduce across two gloo workers, and a
worker failure that Ray Train recovers from the last persisted checkpoint."""

import dataclasses
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("ray")  # the ray marker deselects these tests by default; with -m ray they need ray

import ray
import ray.cloudpickle
from test_pipeline import random_hopper_dataset

from ractd.config import from_dict, to_dict
from ractd.train import RunContext, TrainConfig, train
from ractd_ray.train import (
    GradAllReduce,
    RayTrainConfig,
    StepHook,
    ensure_ray,
    fit_stage,
    forwarded_env,
    worker_context,
)

pytestmark = pytest.mark.ray
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the test's worker loop runs in Ray workers


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ensure_ray("local", num_cpus=2)  # never a cluster left running on the machine
    yield
    ray.shutdown()


def _reward_cfg(run_dir, **kw) -> TrainConfig:
    """The reward stage: a deterministic loss (MSE of an MLP), so a step depends only on the batch."""
    base = dict(task="hopper-medium-replay", stage="reward", scale="tiny", source="local", preset="tiny",
                reward_hidden=(16, 16), steps=1, batch=16, ckpt_every=1, report_every=1, lr=1e-2, warmup=1)
    return TrainConfig(run_dir=str(run_dir), **{**base, **kw})


def _grad_loop(config):
    """Worker loop: one library step through the adapter's RunContext, recording the local (pre-sync) gradient
    and the model, then the collectives on known values."""
    import ractd.train

    os.environ.update(config["env"])
    cfg = from_dict(TrainConfig, config["cfg"])
    ctx = worker_context(cfg, progress=False)
    seen = {}

    def sync(model):
        seen["model"] = model
        seen["local"] = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        ctx.sync_grads(model)

    ractd.train.train(cfg, dataclasses.replace(ctx, sync_grads=sync))
    rank, world = ctx.rank, ctx.world_size
    lin = torch.nn.Linear(300, 2)
    for p in lin.parameters():
        p.grad = torch.full_like(p, rank + 1.0)
    if rank == 0:
        lin.bias.grad = None  # a parameter without a gradient on this rank counts as zeros
    reducer = GradAllReduce(world, bucket_mb=256 * 4 / 2**20)  # 256 floats per bucket: weight, bias apart
    reducer(lin)
    torch.save({"params": {k: v.detach().clone() for k, v in seen["model"].state_dict().items()},
                "local": seen["local"], "weight": lin.weight.grad, "bias": lin.bias.grad, "calls": reducer.calls,
                "sum": ctx.all_reduce_sum(torch.tensor([rank + 1.0, 10.0], dtype=torch.float64)),
                "world": world, "device": ctx.device}, Path(config["out"]) / f"rank{rank}.pt")


def _local_grads(cfg: TrainConfig, rank: int, world: int) -> dict:
    """In one process: rank `rank`'s gradient of the first step (its own batch of batch / world samples)."""
    grads = {}

    def capture(model):
        grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters()})

    train(dataclasses.replace(cfg, run_dir=cfg.run_dir + f"-r{rank}"),
          RunContext(rank=rank, world_size=world, sync_grads=capture, progress=False))
    return grads


def test_two_workers_step_equals_one_process_step_on_the_union_batch(tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    random_hopper_dataset()
    cfg = _reward_cfg(tmp_path / "ray-run")
    out = tmp_path / "out"
    out.mkdir()
    result = TorchTrainer(_grad_loop, train_loop_config={"cfg": to_dict(cfg), "env": forwarded_env(), "out": str(out)},
                          scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
                          run_config=RunConfig(name="grad", storage_path=str(tmp_path / "ray"))).fit()
    assert result.error is None
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2 and r0["device"] == "cpu"

    # collectives on known values: gradients averaged (rank r holds r + 1 -> 1.5), bucketed, missing = zeros
    for r in (r0, r1):
        np.testing.assert_allclose(r["weight"].numpy(), 1.5)
        np.testing.assert_allclose(r["bias"].numpy(), 1.0)  # rank 0: none (0), rank 1: 2
        assert r["calls"] == 2
        np.testing.assert_allclose(r["sum"].numpy(), [3.0, 20.0])

    # each worker's local gradient is the one-process gradient of its own half batch
    ref_cfg = _reward_cfg(tmp_path / "ref")
    local = [_local_grads(ref_cfg, r, 2) for r in (0, 1)]
    for worker, ref in zip((r0, r1), local):
        for name, g in ref.items():
            np.testing.assert_allclose(worker["local"][name].numpy(), g.numpy(), rtol=1e-5, atol=1e-7, err_msg=name)
    assert any(not torch.allclose(local[0][n], local[1][n]) for n in local[0])  # the halves differ

    # one process, one step with the gradient of the union batch: the loss is a mean over equal halves, so the
    # union's gradient is the mean of the two halves' gradients
    union = {n: (local[0][n] + local[1][n]) / 2 for n in local[0]}
    holder = {}

    def set_union(model):
        holder["model"] = model
        for n, p in model.named_parameters():
            p.grad = union[n].clone()

    train(dataclasses.replace(ref_cfg, run_dir=str(tmp_path / "union")),
          RunContext(rank=0, world_size=2, sync_grads=set_union, progress=False))
    expected = holder["model"].state_dict()
    for name, value in expected.items():
        np.testing.assert_array_equal(r0["params"][name].numpy(), r1["params"][name].numpy(), err_msg=name)
        np.testing.assert_allclose(r0["params"][name].numpy(), value.numpy(), rtol=1e-5, atol=1e-5, err_msg=name)
    from ractd.train import build_reward, prepare

    torch.manual_seed(ref_cfg.seed)  # the initial weights, as train() builds them on every rank
    initial = build_reward(ref_cfg.resolved(), prepare(ref_cfg.resolved())).state_dict()
    moved = any(not torch.allclose(initial[n], expected[n]) for n in expected)
    assert moved  # the step changed the weights, so the comparison above is not trivially true


@pytest.mark.slow
def test_worker_failure_restarts_from_the_last_persisted_checkpoint(tmp_path):
    random_hopper_dataset()
    run = tmp_path / "run"
    cfg = _reward_cfg(run, steps=10, ckpt_every=4, report_every=2, lr=1e-3, warmup=2)
    steps_log, marker = tmp_path / "steps.log", tmp_path / "failed-once"
    # rank 1 fails after step 6; the last checkpoint was at step 4; the run folder is lost with it, so only
    # the checkpoint Ray Train persisted can resume the run
    hook = StepHook(log=str(steps_log), fail_at=6, fail_rank=1, marker=str(marker), wipe=str(run / "reward" / "latest"))
    ray_cfg = RayTrainConfig(num_workers=2, use_gpu=False, max_failures=1, storage_path=str(tmp_path / "ray"),
                             name="fail", progress=False)
    out = fit_stage(cfg, ray_cfg, on_step=hook)
    assert marker.exists()
    assert out["step"] == cfg.steps
    assert out["resumed_from"] is not None and Path(out["resumed_from"]).parent.name == "reward-000000004"
    ranks_steps = [tuple(map(int, line.split())) for line in steps_log.read_text().splitlines()]
    rank0 = [s for r, s in ranks_steps if r == 0]
    restart = next(i for i in range(1, len(rank0)) if rank0[i] <= rank0[i - 1])
    first, second = rank0[:restart], rank0[restart:]
    assert first == list(range(1, len(first) + 1)) and len(first) >= 6  # ran up to the failure
    assert second == list(range(5, cfg.steps + 1))  # resumed after the step-4 checkpoint, ran to the end
    redone = len(first) + len(second) - cfg.steps
    assert 0 < redone <= cfg.ckpt_every
    final = torch.load(run / "reward" / "latest" / "checkpoint.pt", weights_only=False)
    assert final["step"] == cfg.steps
    assert Path(out["ray_checkpoint"]).name == "reward-000000010"
