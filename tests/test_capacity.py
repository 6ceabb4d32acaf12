"""Capacity-aware defaults (no Ray instance: the cluster's capacity is given): how many trials train at a time, the
GPU share of a small net's worker, the worker group's start timeout on an autoscaling cluster, the rollout pool's
size; and the score the searcher learns from (ractd_repro.sweep.searcher_report)."""

import math

import pytest

from ractd_ray import resources
from ractd_ray.resources import Capacity, concurrent_trials, gpus_per_worker, start_env
from ractd_repro.records import METRIC
from ractd_repro.sweep import SEARCH_METRIC, SearchConfig, best_so_far, searcher_report

ONE_MACHINE = Capacity(cpus=2, gpus=0, node_cpus=2, node_gpus=0, autoscaling=False)
THREE_NODES = Capacity(cpus=4, gpus=0, node_cpus=2, node_gpus=0, autoscaling=False)  # testcluster: head 0 + 2 x 2
# cluster.yaml: head 4 CPUs, up to 4 x p3.2xlarge (8 CPUs, 1 GPU) and 4 x g5.xlarge (4 CPUs, 1 GPU), none running
AWS = Capacity(cpus=4 + 4 * 8 + 4 * 4, gpus=8, node_cpus=8, node_gpus=1, autoscaling=True)


def test_concurrent_trials_follow_what_the_cluster_can_scale_to():
    assert concurrent_trials(ONE_MACHINE, 1, False, 0, 1, 0.25, limit=12) == 1  # one machine: as before
    assert concurrent_trials(THREE_NODES, 1, False, 0, 1, 0.25, limit=12) == 2  # one per worker node
    assert concurrent_trials(AWS, 1, True, 1.0, 1, 0.25, limit=12) == 8  # every GPU it can launch
    assert concurrent_trials(AWS, 1, True, 0.25, 1, 0.25, limit=12) == 12  # a small net: bounded by the trials
    assert concurrent_trials(AWS, 1, True, 0.25, 1, 0.25, limit=100) == 32
    assert concurrent_trials(AWS, 2, True, 1.0, 1, 0.25, limit=12) == 4  # two GPU workers per trial
    cpu_bound = Capacity(cpus=6, gpus=8, node_cpus=2, node_gpus=1, autoscaling=True)
    assert concurrent_trials(cpu_bound, 1, True, 0.25, 1, 0.25, limit=100) == 4  # 6 CPUs / 1.25 per trial
    assert concurrent_trials(ONE_MACHINE, 1, False, 0, 1, 0.25, limit=0) == 1  # at least one


def test_small_nets_share_a_gpu_and_wide_ones_take_one():
    assert gpus_per_worker(0, 256) == resources.SMALL_NET_GPU_SHARE < 1  # the CPU presets
    assert gpus_per_worker(0, 2048) == 1.0  # the paper's MuJoCo U-Net
    assert gpus_per_worker(0.5, 2048) == 0.5  # what the user asked for wins
    assert gpus_per_worker(0, 256, workers=2) == 1.0  # two ranks of one NCCL group never share a device


def test_worker_groups_wait_for_autoscaled_nodes():
    env = start_env(AWS)
    assert float(env["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"]) > 60  # Ray's default: a GPU node takes minutes
    assert start_env(ONE_MACHINE) == {}


def test_max_concurrent_defaults_to_auto_and_gpu_share_is_validated():
    assert SearchConfig().max_concurrent == 0 and SearchConfig().gpus_per_worker == 0
    SearchConfig(task="maze2d-umaze", gpus_per_worker=0.25).validate()
    from ractd import RactdError

    with pytest.raises(RactdError, match=r"gpus_per_worker=1.5: a share of one GPU"):
        SearchConfig(task="maze2d-umaze", gpus_per_worker=1.5).validate()
    with pytest.raises(RactdError, match=r"max_concurrent=-1: must be a non-negative integer"):
        SearchConfig(task="maze2d-umaze", max_concurrent=-1).validate()


def _layout(monkeypatch, cap, free, **cfg):
    pytest.importorskip("ray")
    import ray

    from ractd_ray import search

    monkeypatch.setattr(resources, "capacity", lambda: cap)
    monkeypatch.setattr(ray, "available_resources", lambda: free)
    scfg = SearchConfig(task="maze2d-umaze", budget="quick", preset="small-maze", **cfg).validate()
    return search._check_resources(scfg, cap.node_gpus >= 1, scfg.stage_config("student"))


def test_search_layout_on_one_machine_and_on_an_autoscaling_gpu_cluster(monkeypatch):
    one = _layout(monkeypatch, ONE_MACHINE, {"CPU": 2.0}, num_samples=2)
    assert (one.concurrent, one.cpus, one.gpus, one.prestart) == (1, 1.5, 0.0, True)  # unchanged on one machine
    assert "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S" in one.env  # the prestarted trial waits for the running one
    aws = _layout(monkeypatch, AWS, {"CPU": 4.0}, num_samples=12)
    assert (aws.concurrent, aws.cpus, aws.gpus, aws.prestart) == (12, 1.0, resources.SMALL_NET_GPU_SHARE, False)
    assert aws.env == start_env(AWS)
    fixed = _layout(monkeypatch, AWS, {"CPU": 4.0}, num_samples=12, max_concurrent=2, gpus_per_worker=1)
    assert (fixed.concurrent, fixed.gpus) == (2, 1.0)


EIGHT_GPU_NODES = Capacity(cpus=16, gpus=8, node_cpus=2, node_gpus=1, autoscaling=False)  # bench/gpu_occupancy.py


def test_gpu_trials_start_one_ahead_per_training_trial_as_drivers_and_trials_left_allow(monkeypatch):
    """Trials of equal length end in waves: with one trial started ahead the other freed GPUs idled for a whole
    start-up (bench/gpu_occupancy.py). On a fixed GPU cluster a trial waits ahead for each training one, as far as
    the CPUs left for their drivers and the trials left allow; CPU trials keep one ahead."""
    many = _layout(monkeypatch, EIGHT_GPU_NODES, {"CPU": 16.0}, num_samples=32, gpus_per_worker=1)
    assert (many.concurrent, many.prestart, many.ahead) == (8, True, 8)
    few = _layout(monkeypatch, EIGHT_GPU_NODES, {"CPU": 16.0}, num_samples=12, gpus_per_worker=1)
    assert (few.concurrent, few.ahead) == (8, 4)  # only 4 trials are left beyond the 8 training
    one = _layout(monkeypatch, ONE_MACHINE, {"CPU": 2.0}, num_samples=4)
    assert (one.prestart, one.ahead) == (True, 1)  # CPU trials: one ahead, as before
    aws = _layout(monkeypatch, AWS, {"CPU": 4.0}, num_samples=12)
    assert (aws.prestart, aws.ahead) == (False, 0)  # autoscaling: nodes launch for trials, none waits ahead


def test_rollout_pool_sizes_itself_to_what_an_autoscaling_cluster_can_launch(monkeypatch):
    pytest.importorskip("ray")
    import ray

    from ractd_ray.pool import PoolConfig, actor_layout

    monkeypatch.setattr(resources, "capacity", lambda: AWS)
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 4.0})  # no GPU node up yet
    n, _, gpus, device = actor_layout(PoolConfig())
    assert (n, gpus, device) == (8 * PoolConfig().actors_per_gpu, 1.0 / PoolConfig().actors_per_gpu, "cuda")
    monkeypatch.setattr(resources, "capacity", lambda: THREE_NODES)
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 3.0})  # a fixed cluster: what is free
    assert actor_layout(PoolConfig())[:3] == (3, 1.0, 0.0)


def test_searcher_learns_the_best_checkpoint_score_the_sweep_ranks_by():
    from ractd_repro.sweep import SCORE_FLOOR

    best = -math.inf
    report, best = searcher_report({"loss": 1.0, "step": 1}, best)  # a loss report before any checkpoint
    assert report[SEARCH_METRIC] == SCORE_FLOOR and METRIC not in report and best == -math.inf
    seen = []
    for score in (10.0, 30.0, float("nan"), 20.0):  # the last checkpoint (an ASHA rung) is not the best
        report, best = searcher_report({METRIC: score, "step": len(seen), "at_checkpoint": True}, best)
        seen.append(report[SEARCH_METRIC])
    assert seen == [10.0, 30.0, 30.0, 30.0] and report[METRIC] == 20.0
    between, best = searcher_report({"loss": 0.5, METRIC: 20.0, "at_checkpoint": False}, best)
    assert between[SEARCH_METRIC] == 30.0 and between[METRIC] == 20.0 and best == 30.0  # unchanged between them
    history = [{METRIC: 10.0}, {METRIC: None}, {METRIC: 30.0}, {METRIC: float("nan")}]
    assert best_so_far(history) == 30.0 and best_so_far([]) == -math.inf
