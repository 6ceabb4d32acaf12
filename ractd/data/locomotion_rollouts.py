"""Recording a SAC actor in a Gymnasium MuJoCo env into the flat D4RL dict, and the small array helpers the
locomotion generator shares (columns that grow without fragmenting the heap, episode returns, .npz files).

Flat D4RL dict: observations / next_observations (N, obs_dim) float32, actions (N, act_dim) float32, rewards
(N,) float32, terminals / timeouts (N,) bool, infos/action_log_probs (N,) float32, infos/qpos (N, nq) and
infos/qvel (N, nv) float64 (the MuJoCo state before the action).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ractd.data.locomotion_recipes import Recipe, require_sb3
from ractd.io import atomic_npz
from ractd.tasks import gym_make

ROW_KEYS = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts", "infos/qpos",
            "infos/qvel", "infos/action_log_probs")
_DTYPES = {"terminals": bool, "timeouts": bool, "infos/qpos": np.float64, "infos/qvel": np.float64}


class Columns:
    """Rows (tuples in ROW_KEYS order) appended into preallocated, doubling numpy columns.

    Keeping each training step's row as small long-lived numpy objects fragmented the heap between torch's
    ~100 KB temporaries (RSS grew ~100 KB per SAC step); a few large column arrays do not.
    """

    def __init__(self, arrays: dict[str, np.ndarray] | None = None):
        self.n = len(arrays["rewards"]) if arrays else 0
        self.cols = dict(arrays) if self.n else None

    def append(self, row: tuple) -> None:
        if self.cols is None:
            self.cols = {k: np.empty((4096,) + np.shape(v), _DTYPES.get(k, np.float32))
                         for k, v in zip(ROW_KEYS, row)}
        cap = len(self.cols["rewards"])
        if self.n == cap:
            for k, col in self.cols.items():
                grown = np.empty((2 * cap,) + col.shape[1:], col.dtype)
                grown[:cap] = col
                self.cols[k] = grown
        for k, v in zip(ROW_KEYS, row):
            self.cols[k][self.n] = v
        self.n += 1

    def arrays(self) -> dict[str, np.ndarray]:
        if self.cols is None:
            return {k: np.empty((0,), _DTYPES.get(k, np.float32)) for k in ROW_KEYS}
        return {k: col[: self.n].copy() for k, col in self.cols.items()}


@contextlib.contextmanager
def one_torch_thread():
    """SAC's small nets gain nothing from threads, and one thread keeps float rounding reproducible."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------ actors


def log_prob(actor, obs: np.ndarray, squashed_actions: np.ndarray) -> np.ndarray:
    """log pi(a|s) of tanh-squashed actions in [-1, 1]: obs (B, obs_dim), actions (B, act_dim) -> (B,)."""
    mean, log_std, _ = actor.get_action_dist_params(torch.as_tensor(obs, dtype=torch.float32))
    dist = actor.action_dist.proba_distribution(mean, log_std)
    return dist.log_prob(torch.as_tensor(squashed_actions, dtype=torch.float32)).numpy()


def actor_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The actor's part of a SAC policy state_dict ("actor.*" keys, prefix dropped); an actor-only state_dict
    is returned as it is."""
    if not any(k.startswith("actor.") for k in state):
        return dict(state)
    return {k[len("actor."):]: v for k, v in state.items() if k.startswith("actor.")}


def load_actor(path: Path, env_id: str, recipe: Recipe):
    """The SB3 SAC actor (torch module) of a saved policy state_dict, or of an actor-only one (the committed
    behavior artifacts keep only the actor: the critics play no part in recording data)."""
    require_sb3()
    from stable_baselines3 import SAC

    env = gym_make(env_id)
    with torch.random.fork_rng(devices=[]):
        model = SAC("MlpPolicy", env, buffer_size=1, policy_kwargs={"net_arch": list(recipe.net_arch)},
                    device="cpu", verbose=0)
    env.close()
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.actor.load_state_dict(actor_state_dict(state))
    model.policy.set_training_mode(False)
    return model.actor


# ------------------------------------------------------------------------------------------------ rollouts


def record_rollouts(actor, env_id: str, *, n_transitions: int | None = None, n_episodes: int | None = None,
                    seed: tuple[int, ...], n_envs: int = 8, desc: str | None = None) -> dict[str, np.ndarray]:
    """Roll out a stochastic SAC actor; returns the flat D4RL dict (module doc).

    n_episodes: exactly that many episodes (one per env, n_envs is ignored). n_transitions: envs run in
    lockstep and start new episodes until the started episodes hold n_transitions; every started episode is
    finished, episodes are ordered by (start step, env index), and the concatenation is cut to exactly
    n_transitions (a cut last episode gets timeouts = True). seed: entropy for the env seeds and the torch
    sampling stream (a forked RNG: global RNG states are left untouched).
    """
    if (n_transitions is None) == (n_episodes is None):
        raise ValueError("give exactly one of n_transitions and n_episodes")
    if n_episodes is not None:
        n_envs = n_episodes
    ss = np.random.SeedSequence(list(seed))
    env_seeds = ss.generate_state(n_envs).tolist()
    torch_seed = int(ss.generate_state(1, dtype=np.uint64)[0] % (2**63))
    envs = [gym_make(env_id) for _ in range(n_envs)]
    obs = np.stack([e.reset(seed=s)[0] for e, s in zip(envs, env_seeds)])
    low, high = envs[0].action_space.low, envs[0].action_space.high
    active = np.ones(n_envs, bool)
    episodes: list[tuple[tuple[int, int], dict[str, np.ndarray]]] = []
    current = [Columns() for _ in range(n_envs)]
    starts = [(0, i) for i in range(n_envs)]
    started_len = 0  # transitions in finished + running episodes
    step = 0
    bar = tqdm(total=n_transitions, desc=desc, unit="step", mininterval=2.0, disable=desc is None)
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(torch_seed)
            while active.any():
                mean, log_std, _ = actor.get_action_dist_params(torch.as_tensor(obs, dtype=torch.float32))
                squashed, logp = actor.action_dist.log_prob_from_params(mean, log_std)
                squashed, logp = squashed.numpy(), logp.numpy()
                for i in np.flatnonzero(active):
                    env, u = envs[i], envs[i].unwrapped
                    action = (low + 0.5 * (squashed[i] + 1.0) * (high - low)).astype(np.float32)
                    qpos, qvel = u.data.qpos.copy(), u.data.qvel.copy()
                    nxt, rew, term, trunc, _ = env.step(action)
                    current[i].append((obs[i], action, rew, nxt, term, trunc, qpos, qvel, logp[i]))
                    started_len += 1
                    bar.update(1)
                    obs[i] = nxt
                    if term or trunc:
                        episodes.append((starts[i], current[i].arrays()))
                        current[i] = Columns()
                        if n_episodes is not None or started_len >= n_transitions:
                            active[i] = False
                        else:
                            obs[i] = env.reset()[0]
                            starts[i] = (step + 1, i)
                step += 1
    finally:
        bar.close()
        for e in envs:
            e.close()
    episodes.sort(key=lambda item: item[0])
    data = concat([arrays for _, arrays in episodes])
    if n_transitions is not None:
        data = {k: v[:n_transitions] for k, v in data.items()}
        if not (data["terminals"][-1] or data["timeouts"][-1]):
            data["timeouts"][-1] = True  # the last episode was cut to make the size exact
    return data


def concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def episode_returns(data: dict[str, np.ndarray]) -> np.ndarray:
    """Undiscounted return of every episode (split on terminals | timeouts; a trailing open episode counts)."""
    ends = np.flatnonzero(data["terminals"] | data["timeouts"]) + 1
    if len(ends) == 0 or ends[-1] != len(data["rewards"]):
        ends = np.append(ends, len(data["rewards"]))
    csum = np.concatenate([[0.0], np.cumsum(data["rewards"], dtype=np.float64)])
    return csum[ends] - csum[np.concatenate([[0], ends[:-1]])]


# ------------------------------------------------------------------------------------------------ files


def save_npz(path: Path, data: dict[str, np.ndarray]) -> None:
    """A flat D4RL dict as .npz, atomically; "/" in keys becomes "__" (load_npz reverses it)."""
    atomic_npz(path, {k.replace("/", "__"): v for k, v in data.items()})


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k.replace("__", "/"): z[k] for k in z.files}
