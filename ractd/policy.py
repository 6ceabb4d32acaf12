"""Policies: conditioning -> sampler -> unnormalized action chunk (MuJoCo) or state plan (maze2d).

Samplers. A `Sampler` is a callable `sample(cond, generators) -> x_0` with cond (B, cond_dim) normalized
conditioning, `generators` a list of B torch.Generators (one per row) and x_0 (B, horizon, dim) in normalized
units, clamped to [-1, 1]. Every random number of row b (its starting noise x_T and any re-noising of
multi-step / ancestral samplers) is drawn from generators[b] alone, with a per-row `torch.randn(shape_tail,
generator=g)`, so a row's sample does not depend on which other rows share the batch (up to float rounding of
batched matmuls/convolutions, which may differ in the last bits between batch sizes). The builders call the
library samplers (edm.sample_heun / sample_euler, ddpm.sample_ddpm / sample_ddim, ctm.sample_student); the
ones with noise inside the loop (DDPM ancestral, multi-step student) get the per-row noise through their
`noise` hook; tests/test_policy.py checks the Heun, DDPM and multi-step student builders against the library
functions at batch 1 with the same generator.

Starting noise of the EDM-family samplers (teacher Heun/Euler, student): `init_scaled=True` draws
x_T ~ N(0, sigma_max^2 I), the marginal the probability-flow ODE assumes; `init_scaled=False` draws
x_T ~ N(0, I), the released code's "reduced initial variance" (mode-seeking; REFERENCE.md). It is an explicit
argument of every builder. DDPM/DDIM always start from N(0, I) (variance preserving).

Locomotion (closed loop, h = obs_history past states, c = horizon future actions): the conditioning of env
row b is the normalized state history, oldest first, flattened: cond = obs_normalizer.normalize(hist)
.reshape(B, h * obs_dim) with hist (B, h, obs_dim) -- exactly `normalize(locomotion_windows(...)["obs"])
.reshape(N, -1)` of the training windows, including their padding: at the start of an episode the missing
past states repeat the first state. The first action of the unnormalized chunk is executed and the policy
replans at every step (c = 16 generated, 1 executed).

Maze2d (open loop, Diffuser protocol, REFERENCE.md): plan once a state sequence of H states conditioned on
cond = concat(normalize(start), normalize([goal_x, goal_y, 0, 0])) of width 2 * obs_dim (the training windows
provide start = first state and goal = last state of each window: `maze_windows(...)["start"]` and
`["goal"]`), then track it with a = (wp_xy - xy) + (wp_vel - vel) toward waypoint t + 1, clipped to the
action space [-1, 1]. After the plan ends the waypoint is the last planned state with zero velocity (as
Diffuser's maze2d evaluation does). Everything here is in D4RL maze2d coordinates; the rollout converts
to and from PointMaze's frame (ractd.maze).
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np
import torch

from ractd import RactdError, ctm, ddpm, edm

log = logging.getLogger(__name__)

Sampler = Callable[[torch.Tensor, Sequence[torch.Generator]], torch.Tensor]
SAMPLER_KINDS = ("heun", "euler", "ddpm", "ddim", "student")
MAZE_TRACKERS = ("pd", "inverse_dynamics", "inverse_dynamics_plan")


# ---------------------------------------------------------------------------------------------- noise

def rowwise_randn(generators: Sequence[torch.Generator], shape_tail: tuple[int, ...], device=None,
                  dtype=torch.float32) -> torch.Tensor:
    """(B, *shape_tail) standard normal noise, row b drawn from generators[b] alone.

    Drawn on the generators' device (CPU generators: CPU) and then moved to `device`, so a seed gives the
    same noise whichever device runs the network."""
    if len(generators) == 0:
        return torch.empty((0, *shape_tail), device=device, dtype=dtype)
    rows = [torch.randn(shape_tail, generator=g, dtype=dtype, device=g.device) for g in generators]
    return torch.stack(rows).to(device)


def _model_device_dtype(model: torch.nn.Module):
    """(device, dtype) the sampler computes in: the model's, except that a network cast to reduced
    precision (ractd.nets.unet1d.to_precision) is fed and read in float32, so noise, scalings and clamping
    stay float32 and a seed draws the same noise at every precision."""
    p = next(model.parameters(), None)
    if p is None:
        return torch.device("cpu"), torch.float32
    return p.device, (p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float32)


def _check_rows(cond: torch.Tensor, generators: Sequence[torch.Generator]) -> None:
    if cond.ndim != 2 or cond.shape[0] != len(generators):
        raise ValueError(f"sampler needs cond (B, cond_dim) and B generators; got cond {tuple(cond.shape)} "
                         f"and {len(generators)} generators")


# ---------------------------------------------------------------------------------------------- builders

def _fast(model: torch.nn.Module, engine) -> bool:
    """Whether a builder runs `model` through ractd.engine: an EngineConfig other than "none" was given and the
    model is a library Denoiser / Student / EpsModel around a plain float32 CPU ConditionalUnet1D (an accelerated,
    bf16-cast, wrapped or GPU model keeps the library path)."""
    if engine is None or engine.engine == "none":
        return False
    from ractd.nets.unet1d import ConditionalUnet1D

    net = getattr(model, "net", None)
    p = next(model.parameters(), None)
    # exactly the library's models: a wrapper (e.g. one that edits their outputs) must keep being called
    plain = type(model) in (edm.Denoiser, ctm.Student, ddpm.EpsModel)
    ok = plain and isinstance(net, ConditionalUnet1D) and p is not None and p.device.type == "cpu" \
        and p.dtype == torch.float32
    if not ok:
        log.info("engine %s: %s around %s is not a library model over a float32 CPU ConditionalUnet1D; running it "
                 "as it is", engine.engine, type(model).__name__, type(net).__name__)
    return ok


def heun_sampler(teacher: edm.Denoiser, shape_tail: tuple[int, int], n_bins: int = edm.N_BINS,
                 init_scaled: bool = True, engine=None) -> Sampler:
    """Teacher Heun over `n_bins` Karras bins (n_bins - 1 steps, 2 (n_bins - 1) network calls), clamped.

    shape_tail = (horizon, dim). x_T ~ N(0, sigma_max^2 I) (init_scaled) or N(0, I), per row.
    engine: None (the Denoiser as it is) or a ractd.engine.EngineConfig: the same solver (edm.sample_heun)
    with the denoiser's noise levels folded in and its U-Net on the engine chosen for the live batch.
    """
    return _edm_ode_sampler(teacher, shape_tail, n_bins, init_scaled, edm.sample_heun, engine)


def euler_sampler(teacher: edm.Denoiser, shape_tail: tuple[int, int], n_bins: int = edm.N_BINS,
                  init_scaled: bool = True, engine=None) -> Sampler:
    """Teacher Euler over `n_bins` Karras bins (n_bins - 1 network calls), clamped; see heun_sampler."""
    return _edm_ode_sampler(teacher, shape_tail, n_bins, init_scaled, edm.sample_euler, engine)


def _edm_ode_sampler(teacher, shape_tail, n_bins, init_scaled, solver, engine=None) -> Sampler:
    shape_tail = tuple(int(v) for v in shape_tail)
    device, dtype = _model_device_dtype(teacher)
    sigmas = edm.karras_sigmas(n_bins, dtype=dtype, device=device)
    bind, folded = teacher.bind, None
    if _fast(teacher, engine):
        from ractd.engine import FastDenoiser

        fast = FastDenoiser(teacher, shape_tail[0], sigmas, engine)
        bind, folded = fast.bind, fast.folded

    def sample(cond: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        _check_rows(cond, generators)
        with torch.inference_mode():
            x_T = rowwise_randn(generators, shape_tail, device, dtype)
            x_T = x_T * edm.SIGMA_MAX if init_scaled else x_T
            return solver(bind(cond.to(device, dtype)), x_T, sigmas, clamp=True)

    sample.folded = folded  # the ractd.engine.FoldedUnet (its selector's choices), None on the library path
    return sample


def ddpm_sampler(model: ddpm.EpsModel, shape_tail: tuple[int, int], n_steps: int | None = None,
                 engine=None) -> Sampler:
    """Ancestral DDPM (ddpm.sample_ddpm) over `ddpm.timesteps(T, n_steps)` (default every step), x_0
    clamped to [-1, 1]; each row's x_T and step noise come from its own generator. engine: see heun_sampler."""
    return _vp_sampler(model, shape_tail, lambda eps_fn, x_T, noise: ddpm.sample_ddpm(
        eps_fn, x_T, model.alphas_cumprod, n_steps, clamp=True, noise=noise), engine)


def ddim_sampler(model: ddpm.EpsModel, shape_tail: tuple[int, int], n_steps: int = 10, engine=None) -> Sampler:
    """Deterministic DDIM (eta = 0, ddpm.sample_ddim) in `n_steps` steps from per-row x_T ~ N(0, I)."""
    return _vp_sampler(model, shape_tail, lambda eps_fn, x_T, noise: ddpm.sample_ddim(
        eps_fn, x_T, model.alphas_cumprod, n_steps, clamp=True, eta=0.0), engine)


def _vp_sampler(model: ddpm.EpsModel, shape_tail, solve, engine=None) -> Sampler:
    """Per-row x_T ~ N(0, I) and per-row step noise around a DDPM-family solver solve(eps_fn, x_T, noise)."""
    shape_tail = tuple(int(v) for v in shape_tail)
    device, dtype = _model_device_dtype(model)
    bind, folded = model.bind, None
    if _fast(model, engine):
        from ractd.engine import FastEpsModel

        fast = FastEpsModel(model, shape_tail[0], engine)
        bind, folded = fast.bind, fast.folded

    def sample(cond: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        _check_rows(cond, generators)
        with torch.inference_mode():
            x_T = rowwise_randn(generators, shape_tail, device, dtype)
            x = solve(bind(cond.to(device, dtype)), x_T,
                      lambda: rowwise_randn(generators, shape_tail, device, dtype))
            return x.clamp(-1.0, 1.0)

    sample.folded = folded
    return sample


def student_sampler(student: ctm.Student, shape_tail: tuple[int, int], n_steps: int = 1,
                    init_scaled: bool = True, t_mids: list[float] | None = None, engine=None) -> Sampler:
    """CTM student: one jump G(x_T, sigma_max, sigma_min) (n_steps = 1, 1 network call), or multi-step
    (paper Table 5): jump to sigma_min, re-noise to t_i with the row's own noise, jump again, ...

    ctm.sample_student with the rows' own noise; t_mids default `ctm.default_t_mids(n_steps)`.
    engine: see heun_sampler (the student's jumps (sigma_max, sigma_min), (t_i, sigma_min) folded in).
    """
    shape_tail = tuple(int(v) for v in shape_tail)
    device, dtype = _model_device_dtype(student)
    t_mids = ctm.default_t_mids(n_steps) if t_mids is None else list(t_mids)
    if len(t_mids) != n_steps - 1:
        raise ValueError(f"{n_steps}-step sampling needs {n_steps - 1} intermediate noise levels, got {len(t_mids)}")
    bind, folded = None, None
    if _fast(student, engine):
        from ractd.engine import FastStudent

        pairs = [(edm.SIGMA_MAX, student.sigma_min)] + [(t, student.sigma_min) for t in t_mids]
        fast = FastStudent(student, shape_tail[0], pairs, engine)
        bind, folded = fast.bind, fast.folded

    def sample(cond: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        _check_rows(cond, generators)
        with torch.inference_mode():
            x_T = rowwise_randn(generators, shape_tail, device, dtype)
            x_T = x_T * edm.SIGMA_MAX if init_scaled else x_T
            model = student if bind is None else bind(cond.to(device, dtype))
            return ctm.sample_student(model, x_T, cond.to(device, dtype), n_steps=n_steps, clamp=True,
                                      t_mids=t_mids, noise=lambda: rowwise_randn(generators, shape_tail, device, dtype))

    sample.folded = folded
    return sample


def make_sampler(kind: str, model: torch.nn.Module, shape_tail: tuple[int, int], **opts) -> Sampler:
    """Dispatch: kind in {heun, euler, ddpm, ddim, student}; opts go to the matching builder."""
    builders = {"heun": heun_sampler, "euler": euler_sampler, "ddpm": ddpm_sampler, "ddim": ddim_sampler,
                "student": student_sampler}
    if kind not in builders:
        raise ValueError(f"unknown sampler kind {kind!r}; expected one of {', '.join(SAMPLER_KINDS)}")
    return builders[kind](model, shape_tail, **opts)


# ---------------------------------------------------------------------------------------------- locomotion

class LocomotionPolicy:
    """Closed-loop chunked policy for n envs: state history -> cond -> sampler -> unnormalized actions.

    sampler: a Sampler producing (B, horizon, act_dim) normalized action chunks.
    obs_normalizer / action_normalizer: ractd.data.windows.Normalizer fitted on the training data.
    obs_history: h, states per conditioning window (the training windows' obs_history).
    Keeps one history per env; call reset(n) before an episode batch.
    """

    def __init__(self, sampler: Sampler, obs_normalizer, action_normalizer, obs_history: int = 1):
        if obs_history < 1:
            raise ValueError(f"obs_history must be >= 1, got {obs_history}")
        self.sampler, self.obs_normalizer, self.action_normalizer = sampler, obs_normalizer, action_normalizer
        self.obs_history = int(obs_history)
        self._hist: np.ndarray | None = None   # (n, h, obs_dim) float32, oldest first
        self._started: np.ndarray | None = None

    def reset(self, n: int) -> None:
        """Forget all histories; the next act() starts a new episode for each of the n envs."""
        self._hist = np.zeros((n, self.obs_history, self.obs_normalizer.dim), dtype=np.float32)
        self._started = np.zeros(n, dtype=bool)

    def _push(self, obs: np.ndarray, rows: np.ndarray) -> None:
        o = obs[rows].astype(np.float32)
        new = ~self._started[rows]
        hist = self._hist[rows]
        hist[new] = o[new, None, :]             # episode start: pad with the first state
        hist[~new] = np.concatenate([hist[~new, 1:], o[~new, None, :]], axis=1)
        self._hist[rows] = hist
        self._started[rows] = True

    def conditioning(self, rows: np.ndarray | None = None) -> torch.Tensor:
        """The current cond of the given env rows: (len(rows), h * obs_dim) float32 normalized history."""
        hist = self._hist if rows is None else self._hist[rows]
        return torch.from_numpy(self.obs_normalizer.normalize(hist).reshape(len(hist), -1))

    def act_chunk(self, obs: np.ndarray, generators: Sequence[torch.Generator],
                  active_mask: np.ndarray | None = None) -> np.ndarray:
        """Record obs (n, obs_dim) into the histories of the active envs and sample one chunk for them.

        generators: n generators (one per env; only active ones are used). Returns (n, horizon, act_dim)
        unnormalized float32, NaN in inactive rows. One sampler call for all active envs.
        """
        if self._hist is None:
            raise RuntimeError("call reset(n) before act()")
        obs = np.asarray(obs)
        n = len(self._hist)
        if obs.shape != (n, self.obs_normalizer.dim) or len(generators) != n:
            raise ValueError(f"act expects obs ({n}, {self.obs_normalizer.dim}) and {n} generators; got "
                             f"{obs.shape} and {len(generators)}")
        rows = np.arange(n) if active_mask is None else np.flatnonzero(np.asarray(active_mask, bool))
        self._push(obs, rows)
        x = self.sampler(self.conditioning(rows), [generators[i] for i in rows])
        chunk = self.action_normalizer.unnormalize(x.detach().cpu().float().numpy())
        out = np.full((n, *chunk.shape[1:]), np.nan, dtype=np.float32)
        out[rows] = chunk
        return out

    def act(self, obs: np.ndarray, generators: Sequence[torch.Generator],
            active_mask: np.ndarray | None = None) -> np.ndarray:
        """The first action of each active env's chunk: (n, act_dim) float32 (NaN rows for inactive envs)."""
        return self.act_chunk(obs, generators, active_mask)[:, 0]


# ---------------------------------------------------------------------------------------------- maze2d

class MazePlanner:
    """Open-loop maze2d planner (Diffuser protocol): plan once from (start, goal), then track the plan.

    sampler: a Sampler producing (B, horizon, 4) normalized state sequences from cond (B, 8).
    obs_normalizer: the Normalizer of the 4-d maze states [x, y, vx, vy] (D4RL coordinates).
    tracker: "pd" (Diffuser's PD rule, MazePlanner.track), "inverse_dynamics" (closed loop: the action from the
        observed state toward each waypoint by `inverse_dynamics`, a ractd.inverse_dynamics.InverseDynamics; its
        track() becomes this instance's track, while the class attribute MazePlanner.track stays the PD rule) or
        "inverse_dynamics_plan" (open loop, the paper's Sec. 4.2: the actions between consecutive planned states,
        InverseDynamics.track_plan).
    """

    def __init__(self, sampler: Sampler, obs_normalizer, horizon: int, tracker: str = "pd",
                 inverse_dynamics=None):
        self.sampler, self.obs_normalizer, self.horizon = sampler, obs_normalizer, int(horizon)
        if tracker not in MAZE_TRACKERS:
            raise RactdError(f"unknown maze tracker {tracker!r}; expected one of {', '.join(MAZE_TRACKERS)}")
        if (tracker != "pd") != (inverse_dynamics is not None):
            raise RactdError(f"tracker={tracker!r}: the inverse dynamics trackers need an inverse_dynamics model, and "
                             "only they take one")
        self.tracker = tracker
        if inverse_dynamics is not None:
            self.track = inverse_dynamics.track if tracker == "inverse_dynamics" else inverse_dynamics.track_plan

    def conditioning(self, start_obs: np.ndarray, goal_xy: np.ndarray) -> torch.Tensor:
        """cond = concat(normalize(start), normalize([gx, gy, 0, 0])): (n, 2 * obs_dim) float32."""
        start = np.asarray(start_obs, dtype=np.float32)
        goal = np.zeros_like(start)
        goal[:, :2] = np.asarray(goal_xy, dtype=np.float32)
        norm = self.obs_normalizer.normalize
        return torch.from_numpy(np.concatenate([norm(start), norm(goal)], axis=1))

    def plan(self, start_obs: np.ndarray, goal_xy: np.ndarray,
             generators: Sequence[torch.Generator]) -> np.ndarray:
        """start_obs (n, 4), goal_xy (n, 2) -> plan (n, horizon, 4) unnormalized; one sampler call."""
        x = self.sampler(self.conditioning(start_obs, goal_xy), generators)
        return self.obs_normalizer.unnormalize(x.detach().cpu().float().numpy())

    @staticmethod
    def track(plan: np.ndarray, obs: np.ndarray, t: int) -> np.ndarray:
        """PD rule toward waypoint t + 1: a = (wp_xy - xy) + (wp_vel - vel), clipped to [-1, 1].

        plan (n, H, 4), obs (n, 4), t the env step (0 at reset). Once t + 1 >= H the waypoint is the
        last planned state with zero velocity. Returns (n, 2) float64 actions (D4RL frame).
        """
        plan = np.asarray(plan, dtype=np.float64)
        obs = np.asarray(obs, dtype=np.float64)
        if t + 1 < plan.shape[1]:
            wp = plan[:, t + 1]
        else:
            wp = plan[:, -1].copy()
            wp[:, 2:] = 0.0
        a = (wp[:, :2] - obs[:, :2]) + (wp[:, 2:] - obs[:, 2:])
        return np.clip(a, -1.0, 1.0)


class StartPinned(torch.nn.Module):
    """Inpainting of a maze2d plan's first state (Diffuser's apply_conditioning) on the model's clean estimate.

    Wraps a teacher Denoiser D(x, sigma, cond) or a Student G(x, t, s, cond) whose output is a normalized state
    sequence (B, H, obs_dim) and cond = concat(normalize(start), normalize(goal)): every output has its first
    state replaced by the given start, cond[:, :obs_dim]. The teacher's ODE then carries x[:, 0] to the start
    (with D pinned, x - start shrinks by u / t per step, to sigma_min / sigma_max of x_T - start) while the network sees the
    pinned state at every later call, so the rest of the plan adapts to it; a one-step student gets the start
    as its first state and nothing else changes; a multi-step student adapts at its later jumps. Diffuser pins x
    itself, having trained on pinned inputs; these models are trained with the start in cond instead, so the
    clean estimate is what is pinned. Attributes (sigma_min, sigma_data, ...) are the wrapped model's.
    """

    def __init__(self, model: torch.nn.Module, obs_dim: int):
        super().__init__()
        self.model, self.obs_dim = model, int(obs_dim)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)

    def forward(self, x: torch.Tensor, *times_and_cond) -> torch.Tensor:
        cond = times_and_cond[-1]
        out = self.model(x, *times_and_cond).clone()
        out[:, 0, :] = cond[:, :self.obs_dim].to(out.dtype)
        return out

    def bind(self, cond: torch.Tensor | None):
        """The Denoiser's bind: (x, sigma) -> D(x, sigma, cond), pinned."""
        return lambda x, sigma: self(x, sigma, cond)


# ---------------------------------------------------------------------------------------------- behavior cloning

class BCPolicy:
    """Closed-loop behavior cloning policy (locomotion) with LocomotionPolicy's interface (reset / act): the
    deterministic actor maps normalize(s) to a normalized action, executed unnormalized at every step. The
    generators are accepted and unused (the policy draws no noise), so seeds differ only by their env reset.

    actor: ractd.nets.mlp.BCActor; obs_normalizer / action_normalizer: the ones it was trained with.
    """

    def __init__(self, actor: torch.nn.Module, obs_normalizer, action_normalizer):
        self.actor, self.obs_normalizer, self.action_normalizer = actor, obs_normalizer, action_normalizer
        self._n = None

    def reset(self, n: int) -> None:
        self._n = int(n)

    def act(self, obs: np.ndarray, generators: Sequence[torch.Generator],
            active_mask: np.ndarray | None = None) -> np.ndarray:
        """(n, act_dim) float32 unnormalized actions of the active envs, NaN rows for inactive ones."""
        if self._n is None:
            raise RuntimeError("call reset(n) before act()")
        obs = np.asarray(obs, np.float32)
        rows = np.arange(len(obs)) if active_mask is None else np.flatnonzero(np.asarray(active_mask, bool))
        out = np.full((len(obs), self.action_normalizer.dim), np.nan, dtype=np.float32)
        out[rows] = _bc_act(self.actor, self.obs_normalizer.normalize(obs[rows]), self.action_normalizer)
        return out


class BCGoalPolicy:
    """Goal-conditioned behavior cloning on maze2d, acting closed loop through MazePlanner's interface.

    rollout_maze calls plan() once per episode batch and track(plan, obs, t) at every step. Here plan() only
    fixes the conditioning goal [gx, gy, 0, 0] (the evaluation goal, in the layout the planner's goal takes), and
    track() feeds the current observed state: a = pi(normalize(s_t), normalize(goal)), clipped to [-1, 1] --
    a reactive policy, trained on (state, goal of the data's controller, action) triples (ractd.bc.prepare_bc).
    """

    tracker = "bc"

    def __init__(self, actor: torch.nn.Module, obs_normalizer, action_normalizer):
        self.actor, self.obs_normalizer, self.action_normalizer = actor, obs_normalizer, action_normalizer

    def plan(self, start_obs: np.ndarray, goal_xy: np.ndarray, generators: Sequence[torch.Generator]) -> np.ndarray:
        """The normalized goal of each episode (n, obs_dim); no network call."""
        start = np.asarray(start_obs, np.float32)
        goal = np.zeros_like(start)
        goal[:, :2] = np.asarray(goal_xy, np.float32)
        return self.obs_normalizer.normalize(goal)

    def track(self, plan: np.ndarray, obs: np.ndarray, t: int) -> np.ndarray:
        """(n, 2) float64 actions (D4RL frame) from the observed states obs (n, 4) toward the goals in `plan`."""
        x = np.concatenate([self.obs_normalizer.normalize(np.asarray(obs, np.float32)), plan], axis=1)
        return np.clip(_bc_act(self.actor, x, self.action_normalizer).astype(np.float64), -1.0, 1.0)


def _bc_act(actor: torch.nn.Module, x: np.ndarray, action_normalizer) -> np.ndarray:
    device, dtype = _model_device_dtype(actor)
    with torch.inference_mode():
        a = actor(torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(device, dtype))
    return action_normalizer.unnormalize(a.float().cpu().numpy())
