"""maze2d geometry: the D4RL <-> PointMaze v3 coordinate pair, the maze grid, the evaluation goal, grid paths.

Pure geometry, shared by dataset generation (ractd.data.generate_maze), the Minari reader
(ractd.data.minari_io), training windows (ractd.data.windows) and evaluation (ractd.rollout). It imports
nothing from ractd.data, so any of those can import it without an import cycle.

Coordinates. D4RL's maze2d model puts the point body at world (1.2, 1.2) and the wall of cell (row i, col j)
at world (i + 1, j + 1), so a D4RL position (x, y) = qpos lies in cell (round(x + 0.2), round(y + 0.2)), and the
goal / reset locations D4RL samples are the integer points (i, j) (0.2 off the cell centre, as in D4RL).
PointMaze v3 centres the maze, puts column j along +x and row i along -y: cell (i, j) is centred at
(j + 0.5 - W/2, L/2 - i - 0.5) for a map of L rows and W columns. The only conversion between the two frames
is the pair `d4rl_to_pointmaze` / `pointmaze_to_d4rl` below (positions shift, vectors -- velocities, actions --
only rotate); everything else in this project works in D4RL coordinates.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from ractd import RactdError
from ractd.tasks import Task

# D4RL geometry: point body at world (1.2, 1.2), wall of cell (i, j) centred at world (i + 1, j + 1).
D4RL_CELL_OFFSET = 0.2
# D4RL maze2d sparse reward: 1 when the position is within this distance of the goal. Also the "at the goal"
# radius of Diffuser's maze2d segmentation (ractd.data.windows.maze_segments).
REWARD_RADIUS = 0.5


def d4rl_to_pointmaze(x, maze_shape: tuple[int, int], vector: bool = False):
    """Map D4RL maze2d coordinates to PointMaze v3 coordinates.

    x: array (..., 2) of positions (vector=False) or of velocities / actions / displacements (vector=True).
    maze_shape: (L rows, W columns) of the maze map. Positions: x_pm = y + 0.2 + 0.5 - W/2,
    y_pm = L/2 - 0.5 - (x + 0.2); vectors: (vx_pm, vy_pm) = (vy, -vx). Returns float64 (..., 2).
    """
    x = np.asarray(x, dtype=np.float64)
    rows, cols = maze_shape
    if vector:
        return np.stack([x[..., 1], -x[..., 0]], axis=-1)
    return np.stack(
        [x[..., 1] + D4RL_CELL_OFFSET + 0.5 - cols / 2, rows / 2 - 0.5 - (x[..., 0] + D4RL_CELL_OFFSET)], axis=-1
    )


def pointmaze_to_d4rl(x, maze_shape: tuple[int, int], vector: bool = False):
    """Inverse of `d4rl_to_pointmaze`: PointMaze v3 (..., 2) → D4RL maze2d (..., 2), float64."""
    x = np.asarray(x, dtype=np.float64)
    rows, cols = maze_shape
    if vector:
        return np.stack([-x[..., 1], x[..., 0]], axis=-1)
    return np.stack(
        [rows / 2 - 0.5 - x[..., 1] - D4RL_CELL_OFFSET, x[..., 0] - D4RL_CELL_OFFSET - 0.5 + cols / 2], axis=-1
    )


def maze_map(task: Task) -> np.ndarray:
    """The task's maze grid (L, W) int8, 1 = wall, 0 = free, read from the PointMaze env registration."""
    import gymnasium as gym

    from ractd.tasks import gymnasium_robotics

    gymnasium_robotics()
    grid = gym.spec(task.env_id).kwargs["maze_map"]
    return np.array([[1 if c == 1 else 0 for c in row] for row in grid], dtype=np.int8)


def eval_goal(task: Task) -> np.ndarray:
    """D4RL's fixed evaluation goal of a maze task, D4RL coordinates (2,) float64."""
    if task.goal_cell is None:
        raise RactdError(f"task {task.name} is not a maze task")
    return np.asarray(task.goal_cell, dtype=np.float64)


def bfs_next_cell(grid: np.ndarray) -> tuple[dict, dict]:
    """Shortest paths on the free cells of `grid` (L, W), 4-connected.

    Returns (next_cell, dist): next_cell[goal][cell] is the neighbour of `cell` one step closer to `goal`
    (absent for cell == goal), dist[goal][cell] the number of moves. Cells are (row, col) tuples.
    """
    free = [tuple(int(v) for v in c) for c in np.argwhere(grid == 0)]
    free_set = set(free)
    next_cell: dict = {}
    dist: dict = {}
    for goal in free:
        nxt, d = {}, {goal: 0}
        queue = deque([goal])
        while queue:
            c = queue.popleft()
            for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                n = (c[0] + dr, c[1] + dc)
                if n in free_set and n not in d:
                    d[n] = d[c] + 1
                    nxt[n] = c  # from n, step to c (one closer to goal)
                    queue.append(n)
        next_cell[goal], dist[goal] = nxt, d
    return next_cell, dist
