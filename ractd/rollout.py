"""Seeded evaluation rollouts batched across seeds -> one record (dict) per episode.

Batching. The N seeds' envs are a plain list of Gymnasium envs stepped in a Python loop (measured in
bench/bench_rollout.py against gymnasium.vector.SyncVectorEnv with 100 Hopper envs: the list is as fast or
slightly faster, 7.6-8.3k vs 7.4-7.5k random steps/s on one core, and it lets finished episodes drop out,
which a vector env's autoreset does not). At every env step the policy makes ONE sampler call for all live
seeds; an episode that terminates or is truncated is not stepped again and leaves the batch.

Overlap. `rollout_locomotion(overlap="thread" | "process")` splits the seeds into two halves that take
turns: the network acts for one half while the other half's envs step, in a worker thread (MuJoCo and the
inference engines release the GIL; torch releases it inside each op) or in a worker process that owns all
the envs ("process" starts it with multiprocessing's spawn, so the caller's __main__ must be importable: a
script file or a -m module, not stdin). Per-seed records are the same as without overlap (each env sees the
same observations, actions and noise; only a half-size batch may round the network's last bits
differently). It pays only when a core would otherwise idle: bench/bench_inference.py, 100 Hopper seeds x
1000 steps, small student on OpenVINO with one network thread, on the 2-CPU machine while other jobs kept
load average 5-9, measured 0.30 of raw env stepping sequential vs 0.26 (thread) and 0.27 (process), and
with the TorchScript (jit) net 0.22 vs 0.20 / 0.18 -- no idle core to overlap into. Hence the default
overlap=False; use "thread" where the rollout owns two otherwise idle cores (envs on one, network on the
other).

Threads. Small networks on a shared CPU: torch's default intra-op threads can make a batch-100 forward 10x
slower under contention (measured 189-1283 ms vs 61 ms with one thread); callers (CLI, Ray actors) should
set torch.set_num_threads to the CPUs they own. This module does not, as that is process-global state.

Reproducibility. Seed k uses env.reset(seed=k) and its own torch.Generator().manual_seed(k) for all sampler
noise (see ractd.policy), and no global RNG is touched, so seed k gives the same episode alone or among 100
seeds -- up to float rounding: batched matmuls/convolutions can round differently at different batch sizes,
which a chaotic env (Hopper) can amplify over a long episode. Nothing here keeps module-level mutable state,
so a rollout can run inside a Ray actor.

Records: task, seed, return, normalized_score (task.normalized_score), length (env steps), time_per_action
(seconds: wall time of the policy calls that produced this episode's actions -- each a batched call over
the live seeds -- divided by its length; maze: the one plan plus the tracking; an inference engine's one-off
build and calibration inside a call left out, ractd.timing.setup), terminated, truncated,
batch_size (seeds stepped together). `summarize` aggregates, `save_records` / `load_records` use Parquet.

Maze2d protocol (D4RL maze2d-sparse, Diffuser's evaluation), all decisions here:
  * env: gym.make(task.env_id, continuing_task=True, reset_target=False, max_episode_steps=
    task.max_episode_steps): episodes never terminate and run to the step limit, as D4RL's maze2d does.
  * start: D4RL's reset -- a uniformly drawn free cell (any free cell, the goal cell included, as D4RL's
    `empty_and_goal_locations`), position (i, j) + U(-0.1, 0.1)^2 and velocity N(0, 0.1^2) in D4RL
    coordinates, drawn from np.random.default_rng(seed), written into PointMaze's MuJoCo state after
    env.reset(seed, options={goal_cell, reset_cell}) (PointMaze's own reset noise is +-0.25 and zero
    velocity, so its start is overwritten).
  * goal and reward: D4RL's fixed evaluation goal (ractd.maze.eval_goal, D4RL coordinates); reward 1 when
    the position after the step is within 0.5 of it (D4RL's sparse reward; PointMaze's own reward uses
    0.45 around its noisy goal and is ignored).
  * coordinates: observations are converted from PointMaze to D4RL coordinates and actions back with
    ractd.maze.pointmaze_to_d4rl / d4rl_to_pointmaze (the one place for the convention).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from ractd.io import atomic_write
from ractd.maze import (
    REWARD_RADIUS,
    d4rl_to_pointmaze,
    eval_goal,
    maze_map,
    pointmaze_to_d4rl,
)
from ractd.tasks import Task, get_task
from ractd.timing import setup_seconds

log = logging.getLogger(__name__)


def _task(task: Task | str) -> Task:
    return get_task(task) if isinstance(task, str) else task


def make_env(task: Task | str, max_steps: int | None = None, **kwargs):
    """One Gymnasium env of the task, limited to max_steps (default task.max_episode_steps); kwargs go to
    gym.make (locomotion).

    Maze tasks get a continuing PointMaze v3 whose goal never moves (see module doc)."""
    from ractd.tasks import gym_make

    task = _task(task)
    steps = int(max_steps or task.max_episode_steps)
    if task.kind == "maze":
        from ractd.tasks import gymnasium_robotics

        gymnasium_robotics()
        return gym_make(task.env_id, continuing_task=True, reset_target=False, max_episode_steps=steps,
                        disable_env_checker=True)
    return gym_make(task.env_id, max_episode_steps=steps, disable_env_checker=True, **kwargs)


def _generators(seeds) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def _policy_seconds(t0: float, setup0: float) -> float:
    """Seconds since perf_counter() was t0, less the one-off set-up done since setup_seconds() was setup0 (an
    inference engine's build or calibration at a new live batch: ractd.timing.setup)."""
    return time.perf_counter() - t0 - (setup_seconds() - setup0)


def _record(task: Task, seed, ret, length, policy_time, terminated, truncated, batch_size) -> dict:
    return {
        "task": task.name,
        "seed": int(seed),
        "return": float(ret),
        "normalized_score": float(task.normalized_score(float(ret))),
        "length": int(length),
        "time_per_action": float(policy_time / max(int(length), 1)),
        "terminated": bool(terminated),
        "truncated": bool(truncated),
        "batch_size": int(batch_size),
    }


# ---------------------------------------------------------------------------------------------- locomotion

OVERLAP_MODES = ("thread", "process")


def rollout_locomotion(task: Task | str, policy, seeds: list[int], max_steps: int | None = None,
                       progress: bool = True, overlap: bool | str = False,
                       env_kwargs: dict | None = None) -> list[dict]:
    """Closed-loop episodes of `policy` (a ractd.policy.LocomotionPolicy, or ractd.export's rollout policy)
    for every seed, stepped together. Returns one record per seed, in the order of `seeds`.

    overlap=False: each step, one policy.act over the live envs (one sampler call), the first action of each
    chunk clipped to the action space, then each live env steps.
    overlap="thread" | "process" (True = "thread"): the seeds are split into two halves that alternate, so
    the network computes one half's actions while the other half's envs step -- in a worker thread (MuJoCo
    and the inference engines release the GIL) or in a worker process that owns all the envs. Each env sees
    exactly the same observations, actions and noise as without overlap (same records: tests/
    test_rollout_overlap.py), up to the float rounding of a batched network call of half the size.
    bench/bench_inference.py measures the modes; the default False was faster on the shared 2-CPU machine
    (see the module doc).
    env_kwargs: extra gym.make arguments (e.g. terminate_when_unhealthy=False for benchmarks).
    """
    from tqdm import tqdm

    task = _task(task)
    steps = int(max_steps or task.max_episode_steps)
    n = len(seeds)
    mode = "thread" if overlap is True else (overlap or None)
    if mode is not None and mode not in OVERLAP_MODES:
        raise ValueError(f"overlap must be False, True or one of {', '.join(OVERLAP_MODES)}; got {overlap!r}")
    if n < 2:
        mode = None
    envs = _EnvGroup(task, steps, seeds, env_kwargs, in_process=mode == "process")
    try:
        gens = _generators(seeds)
        obs = envs.obs
        policy.reset(n)
        st = _EpisodeState(n)
        bar = tqdm(total=steps, desc=task.name, unit="step", disable=not progress, leave=False)

        def act(mask):
            t0, s0 = time.perf_counter(), setup_seconds()
            actions = np.clip(policy.act(obs, gens, mask), envs.low, envs.high)
            st.ptime[mask] += _policy_seconds(t0, s0)
            return actions

        def tick():
            done = int(st.length.max())
            if done > bar.n:
                bar.update(done - bar.n)
                bar.set_postfix(live=int(st.active.sum()), refresh=False)

        if mode is None:
            for _ in range(steps):
                if not st.active.any():
                    break
                rows = np.flatnonzero(st.active)
                actions = act(st.active.copy())
                st.apply(rows, envs.step(rows, actions[rows]), obs)
                tick()
        else:
            halves = np.arange(n) < (n + 1) // 2
            groups = (halves, ~halves)
            g = 0
            mask = st.active & groups[g]
            pending = (np.flatnonzero(mask), act(mask))   # group 0's first actions
            while pending is not None or st.active.any():
                # group g's envs step (worker) while the network acts for the other group (here)
                job = envs.submit(pending[0], pending[1][pending[0]]) if pending is not None else None
                mask = st.active & groups[1 - g]
                nxt = (np.flatnonzero(mask), act(mask)) if mask.any() else None
                if job is not None:
                    st.apply(pending[0], job(), obs)
                pending, g = nxt, 1 - g
                tick()
        bar.close()
    finally:
        envs.close()
    records = [_record(task, s, st.ret[i], st.length[i], st.ptime[i], st.term[i], st.trunc[i], n)
               for i, s in enumerate(seeds)]
    log.info("%s: %d episodes, mean normalized score %.1f", task.name, n,
             float(np.mean([r["normalized_score"] for r in records])) if records else float("nan"))
    return records


class _EpisodeState:
    """Per-seed episode bookkeeping of rollout_locomotion."""

    def __init__(self, n: int):
        self.active = np.ones(n, dtype=bool)
        self.ret, self.length, self.ptime = np.zeros(n), np.zeros(n, dtype=np.int64), np.zeros(n)
        self.term, self.trunc = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)

    def apply(self, rows: np.ndarray, result, obs: np.ndarray) -> None:
        """Record one env step of `rows`: result = (obs, rewards, terminated, truncated) arrays."""
        o, r, te, tr = result
        obs[rows] = o
        for j, i in enumerate(rows):  # per seed, in the same order of additions as a plain loop
            self.ret[i] += r[j]
        self.length[rows] += 1
        done = te | tr
        self.active[rows[done]] = False
        self.term[rows[done]], self.trunc[rows[done]] = te[done], tr[done]


def _step_envs(envs: list, rows: np.ndarray, actions: np.ndarray):
    """Step envs[i] with actions[j] for the j-th i in rows: (obs, rewards, terminated, truncated) arrays."""
    out = [envs[i].step(actions[j]) for j, i in enumerate(rows)]
    if not out:
        return np.zeros((0,) + envs[0].observation_space.shape), np.zeros(0), np.zeros(0, bool), np.zeros(0, bool)
    return (np.stack([o[0] for o in out]), np.array([o[1] for o in out], dtype=np.float64),
            np.array([o[2] for o in out], dtype=bool), np.array([o[3] for o in out], dtype=bool))


def _make_reset_envs(task: Task, steps: int, seeds, env_kwargs):
    envs = [make_env(task, steps, **(env_kwargs or {})) for _ in seeds]
    obs = np.stack([env.reset(seed=int(s))[0] for env, s in zip(envs, seeds)]).astype(np.float32)
    return envs, obs


def _env_worker(conn, task_name: str, steps: int, seeds: list, env_kwargs) -> None:
    """Worker process of overlap="process": owns the envs; answers (rows, actions) with _step_envs."""
    envs = []
    try:
        envs, obs = _make_reset_envs(get_task(task_name), steps, seeds, env_kwargs)
        conn.send(("ok", (obs, envs[0].action_space.low, envs[0].action_space.high)))
        while True:
            msg = conn.recv()
            if msg is None:
                break
            conn.send(("ok", _step_envs(envs, *msg)))
    except BaseException as e:  # reported to the parent, which raises it
        try:
            conn.send(("error", f"{type(e).__name__}: {e}"))
        except (BrokenPipeError, OSError):
            pass
    finally:
        for env in envs:
            env.close()
        conn.close()


class _EnvGroup:
    """The seeds' envs, reset: here (stepped inline or by one worker thread) or in a worker process.

    step(rows, actions) -> result; submit(rows, actions) -> a callable that waits for the result."""

    def __init__(self, task: Task, steps: int, seeds, env_kwargs, in_process: bool):
        self._proc = self._conn = self._pool = None
        self.envs = []
        if in_process:
            import multiprocessing as mp

            ctx = mp.get_context("spawn")  # no fork of a process holding torch / engine thread pools
            self._conn, child = ctx.Pipe()
            self._proc = ctx.Process(target=_env_worker, args=(child, task.name, steps, list(seeds), env_kwargs),
                                     daemon=True)
            self._proc.start()
            child.close()
            self.obs, self.low, self.high = self._recv()
        else:
            from concurrent.futures import ThreadPoolExecutor

            self.envs, self.obs = _make_reset_envs(task, steps, seeds, env_kwargs)
            self.low, self.high = self.envs[0].action_space.low, self.envs[0].action_space.high
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="ractd-envs")

    def _recv(self):
        try:
            status, payload = self._conn.recv()
        except EOFError:
            raise RuntimeError(f"env worker process exited (code {self._proc.exitcode})") from None
        if status != "ok":
            raise RuntimeError(f"env worker process failed: {payload}")
        return payload

    def step(self, rows, actions):
        return self.submit(rows, actions)()

    def submit(self, rows, actions):
        if self._conn is not None:
            self._conn.send((rows, actions))
            return self._recv
        if not len(rows):
            return lambda: _step_envs(self.envs, rows, actions)
        return self._pool.submit(_step_envs, self.envs, rows, actions).result

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        for env in self.envs:
            env.close()
        if self._proc is not None:
            try:
                self._conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            self._proc.join(timeout=10)
            if self._proc.is_alive():
                self._proc.kill()
            self._conn.close()


# ---------------------------------------------------------------------------------------------- maze2d

def maze_sparse_reward(pos_xy: np.ndarray, goal_xy: np.ndarray) -> np.ndarray:
    """D4RL maze2d sparse reward: 1.0 where ||pos - goal|| <= 0.5, else 0.0. pos_xy (..., 2), goal_xy (2,)."""
    d = np.linalg.norm(np.asarray(pos_xy, np.float64) - np.asarray(goal_xy, np.float64), axis=-1)
    return (d <= REWARD_RADIUS).astype(np.float64)


def env_obs_to_d4rl(obs_pm: np.ndarray, maze_shape: tuple[int, int]) -> np.ndarray:
    """PointMaze observation [x, y, vx, vy] (..., 4) -> D4RL maze2d coordinates (..., 4) float64."""
    obs_pm = np.asarray(obs_pm, np.float64)
    return np.concatenate([pointmaze_to_d4rl(obs_pm[..., :2], maze_shape),
                           pointmaze_to_d4rl(obs_pm[..., 2:], maze_shape, vector=True)], axis=-1)


def maze_reset(env, task: Task, seed: int, grid: np.ndarray) -> np.ndarray:
    """Reset a PointMaze env D4RL-style for `seed` (see module doc); returns the start obs (4,), D4RL frame."""
    rng = np.random.default_rng(int(seed))
    free = np.argwhere(grid == 0)
    cell = free[rng.integers(len(free))]
    pos = cell.astype(np.float64) + rng.uniform(-0.1, 0.1, size=2)
    vel = rng.normal(0.0, 0.1, size=2)
    env.reset(seed=int(seed), options={"goal_cell": np.asarray(task.goal_cell), "reset_cell": cell})
    shape = grid.shape
    env.unwrapped.point_env.set_state(d4rl_to_pointmaze(pos, shape), d4rl_to_pointmaze(vel, shape, vector=True))
    return np.concatenate([pos, vel])


def evaluation_plans(task: Task | str, planner, seeds) -> tuple[np.ndarray, np.ndarray]:
    """(starts (n, 4), plans (n, H, obs_dim)), D4RL frame: the plans rollout_maze makes for these seeds -- the
    D4RL-style reset of each seed, one batched planner call toward the evaluation goal -- without the episodes."""
    task = _task(task)
    grid, seeds = maze_map(task), [int(s) for s in seeds]
    env = make_env(task, 1)
    try:  # a reset depends on its seed only: one env serves every start
        starts = np.stack([maze_reset(env, task, s, grid) for s in seeds])
    finally:
        env.close()
    plans = planner.plan(starts, np.broadcast_to(eval_goal(task), (len(seeds), 2)), _generators(seeds))
    return starts, np.asarray(plans)


def rollout_maze(task: Task | str, planner, seeds: list[int], max_steps: int | None = None,
                 progress: bool = True) -> list[dict]:
    """Plan once per seed (one batched planner call), then track the plans open loop for max_steps steps
    (default task.max_episode_steps). planner: a ractd.policy.MazePlanner. One record per seed."""
    from tqdm import tqdm

    task = _task(task)
    if task.kind != "maze":
        raise ValueError(f"rollout_maze needs a maze task, got {task.name}")
    steps = int(max_steps or task.max_episode_steps)
    grid = maze_map(task)
    shape = grid.shape
    goal = eval_goal(task)
    n = len(seeds)
    envs = [make_env(task, steps) for _ in range(n)]
    try:
        obs = np.stack([maze_reset(env, task, s, grid) for env, s in zip(envs, seeds)])
        t0, s0 = time.perf_counter(), setup_seconds()
        plan = planner.plan(obs, np.broadcast_to(goal, (n, 2)), _generators(seeds))
        ptime = _policy_seconds(t0, s0)
        ret, length = np.zeros(n), np.zeros(n, dtype=np.int64)
        term, trunc = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        active = np.ones(n, dtype=bool)
        for t in tqdm(range(steps), desc=task.name, unit="step", disable=not progress, leave=False):
            if not active.any():
                break
            t0, s0 = time.perf_counter(), setup_seconds()
            act_pm = d4rl_to_pointmaze(planner.track(plan, obs, t), shape, vector=True)
            ptime += _policy_seconds(t0, s0)
            for i in np.flatnonzero(active):
                o, _, te, tr, _ = envs[i].step(act_pm[i])
                obs[i] = env_obs_to_d4rl(o["observation"], shape)
                ret[i] += maze_sparse_reward(obs[i, :2], goal)
                length[i] += 1
                if te or tr:
                    active[i], term[i], trunc[i] = False, te, tr
    finally:
        for env in envs:
            env.close()
    # One plan and one tracking pass serve all seeds: each episode is charged the whole batch's policy time.
    records = [_record(task, s, ret[i], length[i], ptime, term[i], trunc[i], n) for i, s in enumerate(seeds)]
    log.info("%s: %d episodes, mean normalized score %.1f", task.name, n,
             float(np.mean([r["normalized_score"] for r in records])) if records else float("nan"))
    return records


# ---------------------------------------------------------------------------------------------- records

def summarize(records: list[dict]) -> dict:
    """{n, score_mean, score_sem, return_mean, time_per_action_mean} over the records.

    score_sem = std(ddof=1) / sqrt(n) of the normalized scores (NaN for n < 2)."""
    if not records:
        raise ValueError("summarize needs at least one record")
    scores = np.array([r["normalized_score"] for r in records], dtype=np.float64)
    n = len(scores)
    return {
        "n": n,
        "score_mean": float(scores.mean()),
        "score_sem": float(scores.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
        "return_mean": float(np.mean([r["return"] for r in records])),
        "time_per_action_mean": float(np.mean([r["time_per_action"] for r in records])),
    }


def save_records(records: list[dict], path) -> Path:
    """Write records (flat dicts with one schema) as Parquet, atomically (ractd.io.atomic_write)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(list(records))
    path = atomic_write(path, lambda f: pq.write_table(table, f))
    log.info("wrote %d records to %s", len(records), path)
    return path


def load_records(path) -> list[dict]:
    """Read records written by save_records: a list of dicts."""
    import pyarrow.parquet as pq

    return pq.read_table(Path(path)).to_pylist()
