"""maze2d dataset generation with D4RL's recipe, simulated in Gymnasium-Robotics PointMaze v3.

Recipe (D4RL `generate_maze2d_datasets`, REFERENCE.md): one long, never-reset trajectory of a point mass. A goal
is drawn uniformly from the free cells (cell location + U(-0.1, 0.1)); a waypoint controller follows the grid
shortest path (BFS over free cells) with the PD law a = 10 (waypoint - pos) - vel, optionally adds N(0, 0.5^2)
action noise, clips to [-1, 1]. When the goal is reached (within 0.1 and slower than 0.1) or its budget of
`task.max_episode_steps` steps runs out, a new goal is drawn and the point continues from where it is.

Output, D4RL maze2d format, all in D4RL coordinates (below), N steps:
    observations (N, 4) float32  [x, y, vx, vy]
    actions      (N, 2) float32
    rewards      (N,)   float32  1 if the position after the step is within 0.5 of the current goal
    terminals    (N,)   bool     all False (maze2d never terminates)
    timeouts     (N,)   bool     True on the last step of each goal (arrival or budget spent): one
                                 "episode" per goal; the trajectory itself stays continuous across them
    infos/goal (N, 2), infos/qpos (N, 2), infos/qvel (N, 2) float32
    metadata/*: task, seed, noise, env_id, eval_goal (D4RL coords), coordinates="d4rl", goals_reached, ...

Coordinates: D4RL maze2d coordinates throughout; the MuJoCo state lives in PointMaze v3 coordinates and is
converted with ractd.maze.d4rl_to_pointmaze / pointmaze_to_d4rl (the convention is described there).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import numpy as np

from ractd import RactdError
from ractd.data.d4rl import local_dataset_path, write_d4rl_hdf5
from ractd.maze import (
    D4RL_CELL_OFFSET,
    REWARD_RADIUS,
    bfs_next_cell,
    d4rl_to_pointmaze,
    eval_goal,
    maze_map,
)
from ractd.tasks import SCALES, Task, get_task

log = logging.getLogger(__name__)

# Controller and goal constants of the D4RL recipe.
P_GAIN = 10.0
D_GAIN = -1.0
ACTION_NOISE_STD = 0.5
GOAL_POS_THRESHOLD = 0.1  # "reached": within 0.1 of the goal ...
GOAL_VEL_THRESHOLD = 0.1  # ... and slower than 0.1 (so segments end at rest, as the planner's goal assumes)
WAYPOINT_RADIUS = 0.3  # advance to the next cell on the path once within this distance of a cell centre
VELOCITY_CLIP = 5.0  # PointMaze (and D4RL) clip qvel to [-5, 5] before each step
TINY_STEPS = 5_000
SMALL_FRACTION = 0.1


def scale_steps(task: Task, scale: str) -> int:
    """Steps generated at a scale: tiny = 5k (tests), small = 10% of D4RL's size, full = D4RL's size."""
    if scale == "tiny":
        return TINY_STEPS
    if scale == "small":
        return int(task.dataset_size * SMALL_FRACTION)
    if scale == "full":
        return task.dataset_size
    raise RactdError(f"unknown scale {scale!r}; expected one of {', '.join(SCALES)}")


def generate_maze_arrays(task: Task | str, n_steps: int, seed: int = 0, noise: bool = True,
                         progress: bool = True) -> tuple[dict[str, np.ndarray], dict]:
    """Run the D4RL maze2d recipe for `n_steps` steps; returns (data, metadata) as described in the module doc.

    Deterministic given (task, n_steps, seed, noise). Steps the PointMaze MuJoCo model directly
    (env.unwrapped.point_env), replicating PointEnv.step: clip action, clip qvel to [-5, 5], mj_step.
    One random stream (numpy, seeded by `seed`) draws, in this order: the action noise of every step, the start
    state, then each goal as the previous one ends.
    """
    import gymnasium as gym

    from ractd.tasks import gymnasium_robotics

    task = get_task(task) if isinstance(task, str) else task
    if task.kind != "maze":
        raise RactdError(f"task {task.name} is not a maze task")
    if n_steps <= 0:
        raise RactdError(f"number of steps must be positive, got {n_steps}")
    gymnasium_robotics()
    env = gym.make(task.env_id, continuing_task=True)
    env.reset(seed=seed)
    point = env.unwrapped.point_env
    geo = _geometry(task)
    rng = np.random.default_rng(seed)
    noise_arr = rng.normal(0.0, ACTION_NOISE_STD, size=(n_steps, 2)) if noise else np.zeros((n_steps, 2))
    _reset_point(point, geo, rng)
    arrays, attempts, reached = _drive(task, point, geo, rng, noise_arr.tolist(), progress)
    env.close()
    obs = arrays["observations"]
    data = {**arrays, "terminals": np.zeros(n_steps, dtype=bool), "infos/qpos": obs[:, :2].copy(),
            "infos/qvel": obs[:, 2:].copy()}
    data = {k: data[k] for k in ("observations", "actions", "rewards", "terminals", "timeouts", "infos/goal",
                                 "infos/qpos", "infos/qvel")}
    metadata = {
        "task": task.name,
        "env_id": task.env_id,
        "generator": "ractd.data.generate_maze (D4RL maze2d recipe)",
        "coordinates": "d4rl",
        "seed": int(seed),
        "noise": bool(noise),
        "eval_goal": [float(v) for v in eval_goal(task)],
        "goals_attempted": int(attempts),
        "goals_reached": int(reached),
    }
    log.info("%s: %d steps, %d/%d goals reached", task.name, n_steps, reached, attempts)
    return data, metadata


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """The maze as the controller sees it: grid shape, BFS next cell and distance towards every goal cell
    (ractd.maze.bfs_next_cell), the free cells (sorted), and (ox, oy) = d4rl_to_pointmaze((0, 0))."""

    shape: tuple[int, int]
    next_cell: dict
    dist: dict
    free: list
    ox: float
    oy: float


def _geometry(task: Task) -> _Geometry:
    grid = maze_map(task)
    next_cell, dist = bfs_next_cell(grid)
    origin_pm = d4rl_to_pointmaze(np.zeros(2), grid.shape)
    return _Geometry(grid.shape, next_cell, dist, sorted(next_cell), float(origin_pm[0]), float(origin_pm[1]))


def _sample_location(rng: np.random.Generator, free: list) -> tuple[float, float]:
    """A free cell's location + U(-0.1, 0.1) per coordinate (D4RL coordinates)."""
    i, j = free[rng.integers(len(free))]
    return i + rng.uniform(-0.1, 0.1), j + rng.uniform(-0.1, 0.1)


def _cell_of(x: float, y: float) -> tuple[int, int]:
    return (math.floor(x + D4RL_CELL_OFFSET + 0.5), math.floor(y + D4RL_CELL_OFFSET + 0.5))


def _new_goal(rng: np.random.Generator, free: list) -> tuple[float, float, tuple[int, int]]:
    gx, gy = _sample_location(rng, free)
    return gx, gy, _cell_of(gx, gy)


def _reset_point(point, geo: _Geometry, rng: np.random.Generator) -> None:
    """D4RL reset_model: a free cell location + U(-0.1, 0.1), velocity N(0, 0.1^2); the MuJoCo state lives in
    PointMaze coordinates."""
    import mujoco

    x, y = _sample_location(rng, geo.free)
    vx, vy = rng.normal(0.0, 0.1, size=2)
    point.data.qpos[:] = d4rl_to_pointmaze([x, y], geo.shape)
    point.data.qvel[:] = d4rl_to_pointmaze([vx, vy], geo.shape, vector=True)
    mujoco.mj_forward(point.model, point.data)


def _waypoint(x: float, y: float, wcell, gcell, gx: float, gy: float, nxt: dict, dg: dict):
    """(waypoint cell, wx, wy): the next cell centre on the shortest path to the goal cell (the goal itself in
    its cell); replanned when noise pushed the point off the path edge, advanced within WAYPOINT_RADIUS."""
    off = D4RL_CELL_OFFSET
    cur = _cell_of(x, y)
    if wcell is None or (cur != wcell and not (abs(cur[0] - wcell[0]) + abs(cur[1] - wcell[1]) == 1
                                               and dg.get(cur, -1) == dg[wcell] + 1)):
        wcell = cur if cur == gcell or cur not in nxt else nxt[cur]
    if wcell != gcell and math.hypot(x - (wcell[0] - off), y - (wcell[1] - off)) < WAYPOINT_RADIUS:
        wcell = nxt[wcell]
    if wcell == gcell:
        return wcell, gx, gy
    return wcell, wcell[0] - off, wcell[1] - off


def _drive(task: Task, point, geo: _Geometry, rng: np.random.Generator, noise_list: list,
           progress: bool) -> tuple[dict[str, np.ndarray], int, int]:
    """The never-reset trajectory of len(noise_list) steps: PD control towards each goal's waypoints, a new goal
    on arrival or when its budget runs out. Returns ({observations, actions, rewards, timeouts, infos/goal},
    goals attempted, goals reached)."""
    import mujoco
    from tqdm import tqdm

    n_steps = len(noise_list)
    obs = np.empty((n_steps, 4), dtype=np.float32)
    act = np.empty((n_steps, 2), dtype=np.float32)
    rew = np.zeros(n_steps, dtype=np.float32)
    goals = np.empty((n_steps, 2), dtype=np.float32)
    timeouts = np.zeros(n_steps, dtype=bool)
    reached = attempts = budget = 0
    gx, gy, gcell = _new_goal(rng, geo.free)
    wcell = None
    # The hot loop inlines the conversion pair: pm = (y + ox, oy - x) for positions, (vy, -vx) for vectors,
    # with (ox, oy) = d4rl_to_pointmaze((0, 0)); test_generated_steps_replay_through_the_gym_env checks it.
    ox, oy = geo.ox, geo.oy
    model, mjdata = point.model, point.data
    qpos, qvel, ctrl = mjdata.qpos, mjdata.qvel, mjdata.ctrl
    for t in tqdm(range(n_steps), desc=f"{task.name}", unit="step", disable=not progress, mininterval=1.0):
        # Read the state in D4RL coordinates (inverse of d4rl_to_pointmaze, inlined for speed).
        px, py, pvx, pvy = qpos[0], qpos[1], qvel[0], qvel[1]
        x, y = -(py - oy), px - ox
        vx, vy = -pvy, pvx
        wcell, wx, wy = _waypoint(x, y, wcell, gcell, gx, gy, geo.next_cell[gcell], geo.dist[gcell])
        nz = noise_list[t]
        ax = min(1.0, max(-1.0, P_GAIN * (wx - x) + D_GAIN * vx + nz[0]))
        ay = min(1.0, max(-1.0, P_GAIN * (wy - y) + D_GAIN * vy + nz[1]))
        obs[t] = (x, y, vx, vy)
        act[t] = (ax, ay)
        goals[t] = (gx, gy)
        # PointEnv.step: clip velocity, apply the (PointMaze-frame) action, one MuJoCo step.
        qvel[0] = min(VELOCITY_CLIP, max(-VELOCITY_CLIP, qvel[0]))
        qvel[1] = min(VELOCITY_CLIP, max(-VELOCITY_CLIP, qvel[1]))
        ctrl[0], ctrl[1] = ay, -ax
        mujoco.mj_step(model, mjdata)
        nx, ny = -(qpos[1] - oy), qpos[0] - ox
        if math.hypot(nx - gx, ny - gy) <= REWARD_RADIUS:
            rew[t] = 1.0
        budget += 1
        done = math.hypot(x - gx, y - gy) <= GOAL_POS_THRESHOLD and math.hypot(vx, vy) <= GOAL_VEL_THRESHOLD
        if done or budget >= task.max_episode_steps:
            timeouts[t] = True
            attempts += 1
            reached += int(done)
            gx, gy, gcell = _new_goal(rng, geo.free)
            wcell, budget = None, 0
    return {"observations": obs, "actions": act, "rewards": rew, "timeouts": timeouts, "infos/goal": goals}, \
        attempts, reached


def generate_maze(task: Task | str, scale: str = "full", seed: int = 0, out=None, noise: bool = True,
                  n_steps: int | None = None, progress: bool = True) -> Path:
    """Generate a maze2d dataset and write it as D4RL HDF5; returns the path.

    scale: tiny | small | full (see `scale_steps`), overridden by n_steps. out: default
    ractd.data.d4rl.local_dataset_path(task, scale).
    """
    task = get_task(task) if isinstance(task, str) else task
    steps = n_steps if n_steps is not None else scale_steps(task, scale)
    data, metadata = generate_maze_arrays(task, steps, seed=seed, noise=noise, progress=progress)
    metadata["scale"] = scale
    path = Path(out) if out is not None else local_dataset_path(task, scale)
    return write_d4rl_hdf5(path, data, metadata)
