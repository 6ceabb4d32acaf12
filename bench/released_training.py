"""A reconstruction of the released code's training step (Ddduanxt/RACTD, with Chi et al.'s diffusion_policy; CORL
for BC) on this project's modules and weights, for bench/bench_training.py's "released" mode. Written from reading
that code (no code copied): per stage, the work its step does between two batches.

    teacher  edm_workspace_d4rl + KarrasUnetHybridD4RLPolicy.compute_loss: a DataLoader batch of per-sample windows
             (dict of numpy slices -> tensors, default collate; num_workers 0 here: its 8 workers would share
             this machine's CPUs with the step), normalization, the inpainting mask, log-normal sigma, the boundary
             scalings with 250 ln(sigma + 1e-44), the elementwise pseudo-Huber times lambda(sigma) (einsum), backward,
             torch's AdamW (for-loop on CPU), zero_grad, the LR schedule, EMAModel.step (a Python loop over modules
             and their parameters: mul_ and add_), loss.item()
    student  guided_ctm_workspace_d4rl + GuidedCTMPUnetD4RLPolicy.compute_loss: its CTM time sampling (s and u
             drawn one sample at a time in Python), the teacher's Heun step with per-sample clamped bins (Python
             loops), the student's G at (t, s), the target network (a separate copy, EMA decay 0) at (u, s), both
             back to sigma_min, the DSM jump from the "ctm_dsm" half-and-half sigma, the reward on the DSM
             prediction's first action, three .item() calls, backward, for-loop AdamW, the schedule, the target
             copy's foreach mul_/add_ update
    reward   reward_d4rl_workspace: horizon-1 windows through the DataLoader, normalization, MSE, AdamW, EMAModel
    bc       CORL's any_percent_bc step: numpy random indices into the replay buffer's tensors (states, actions,
             rewards, next states, dones), MSE, Adam, loss.item()

The U-Net is called as Chi et al.'s ConditionalUnet1D calls itself (`ReleasedNet`): the time embeddings on every
call, and in every FiLM block its own Mish + Linear of concat(time embeddings, conditioning).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from ractd import edm

SIGMA_MIN, SIGMA_MAX, RHO, BINS, SD = edm.SIGMA_MIN, edm.SIGMA_MAX, edm.RHO, edm.N_BINS, edm.SIGMA_DATA


class ReleasedNet(nn.Module):
    """Our U-Net's weights called with Chi et al.'s per-call work: F(x, times, cond)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.blocks = net.film_blocks()

    def forward(self, x, times, cond):
        c = torch.cat([self.net.time_embed(t) for t in times] + ([cond] if cond is not None else []), dim=-1)
        return self.net.body(x, [b.film(c) for b in self.blocks])  # film = Sequential(Mish, Linear), per block


class Windows(torch.utils.data.Dataset):
    """The released dataset: one window of `horizon` steps per item, sliced out of the flat buffers."""

    def __init__(self, data: dict, horizon: int):
        self.buffers = {"observations": data["observations"], "actions": data["actions"], "rewards": data["rewards"]}
        ends = np.flatnonzero(np.asarray(data["terminals"]) | np.asarray(data["timeouts"])) + 1
        starts = np.concatenate([[0], ends[:-1]])
        self.starts = np.concatenate([np.arange(s, e - horizon + 1) for s, e in zip(starts, ends)])
        self.horizon = horizon

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, i):
        s = self.starts[i]
        return {k: torch.from_numpy(v[s:s + self.horizon]) for k, v in self.buffers.items()}


def _normalizer(a: np.ndarray):
    """LinearNormalizer's min/max to [-1, 1]: (scale, offset)."""
    lo, hi = np.atleast_1d(a.min(0)), np.atleast_1d(a.max(0))
    scale = 2.0 / np.maximum(hi - lo, 1e-7)
    return torch.from_numpy(scale.astype(np.float32)), torch.from_numpy((-1.0 - lo * scale).astype(np.float32))


def append_dims(x, n):
    return x.reshape(x.shape + (1,) * (n - x.ndim))


def timesteps_to_times(ts):
    t = (SIGMA_MAX ** (1 / RHO) + ts / (BINS - 1) * (SIGMA_MIN ** (1 / RHO) - SIGMA_MAX ** (1 / RHO))) ** RHO
    return t.clamp(SIGMA_MIN, SIGMA_MAX)


def boundary(time):
    c_skip = SD**2 / ((time - SIGMA_MIN) ** 2 + SD**2)
    c_out = (time - SIGMA_MIN) * SD / (time**2 + SD**2) ** 0.5
    return c_skip, c_out, 1 / (time**2 + SD**2) ** 0.5


def calc_out(model, traj, times, cond):
    c_skip, c_out, c_in = [append_dims(c, traj.ndim) for c in boundary(times)]
    out = model(traj * c_in, (1000 * 0.25 * torch.log(times + 1e-44),), cond)
    return out * c_out + traj * c_skip


def ctm_calc_out(model, traj, times, stops, cond):
    c_skip, c_out, c_in = [append_dims(c, traj.ndim) for c in boundary(times)]
    rt = (1000 * 0.25 * torch.log(times + 1e-44)).expand(traj.shape[0])
    rs = (1000 * 0.25 * torch.log(stops + 1e-44)).expand(traj.shape[0])
    out = model(traj * c_in, (rt, rs), cond) * c_out + traj * c_skip
    ratio = (stops / times).unsqueeze(-1).unsqueeze(-1).expand(*out.shape)
    return traj * ratio + out * (1 - ratio)


def huber(pred, target, weights=None):
    delta = math.sqrt(math.prod(pred.shape[1:])) * 0.00054
    mse = F.mse_loss(pred, target, reduction="none")
    loss = torch.sqrt(mse**2 + delta**2) - delta
    if weights is not None:
        loss = torch.einsum("b T D, b -> b T D", loss, weights)
    return loss.mean()


def karras_weights(times):
    return (times**2 + SD**2) / ((times * SD) ** 2)


def inpainting_mask(shape, action_dim):
    """LowdimMaskGenerator(action_dim, obs_dim 0, max_n_obs_steps 1, fixed obs steps, actions not visible)."""
    b, t, d = shape
    dim_mask = torch.zeros(shape, dtype=torch.bool)
    is_action = dim_mask.clone()
    is_action[..., :action_dim] = True
    is_obs = ~is_action
    obs_steps = torch.full((b,), fill_value=1)
    steps = torch.arange(0, t).reshape(1, t).expand(b, t)
    obs_mask = (steps.T < obs_steps).T.reshape(b, t, 1).expand(b, t, d) & is_obs
    return obs_mask


@torch.no_grad()
def ema_model_step(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """diffusion_policy's EMAModel.step: every module's own parameters, mul_ and add_ (a copy for frozen ones)."""
    for module, ema_module in zip(model.modules(), ema.modules()):
        for param, ema_param in zip(module.parameters(recurse=False), ema_module.parameters(recurse=False)):
            if isinstance(module, _BatchNorm) or not param.requires_grad:
                ema_param.copy_(param.to(dtype=ema_param.dtype).data)
            else:
                ema_param.mul_(decay)
                ema_param.add_(param.data.to(dtype=ema_param.dtype), alpha=1 - decay)


def ema_decay(step: int, power: float = 0.75, max_value: float = 0.9999) -> float:
    step = max(0, step - 1)
    return 0.0 if step <= 0 else max(0.0, min(1 - (1 + step) ** -power, max_value))


class ReleasedCase:
    """The released step of `run`'s stage on its model, optimizer (set to for-loop by the caller) and data: call
    `step()`."""

    def __init__(self, run, data: dict):
        self.run, self.cfg, self.n = run, run.cfg, 0
        stage = run.cfg.stage
        batch = run.cfg.batch
        self.norm = {k: _normalizer(np.asarray(data[k], np.float32)) for k in ("observations", "actions", "rewards")}
        if stage == "bc":
            p = run.prep
            self.buffer = [torch.from_numpy(a) for a in (p.cond, p.x, np.zeros(len(p.x), np.float32), p.cond,
                                                         np.zeros(len(p.x), np.float32))]
            self.step = self._bc
            return
        horizon = 1 if stage == "reward" else run.prep.shape_tail[0]
        self.loader = torch.utils.data.DataLoader(Windows(data, horizon), batch_size=batch, shuffle=True,
                                                  num_workers=0, drop_last=True)
        self.it = iter(self.loader)
        if stage == "reward":
            self.ema = copy.deepcopy(run.model).requires_grad_(False)
            self.step = self._reward
        elif stage == "teacher":
            self.F = ReleasedNet(run.model.net)
            self.step = self._teacher
        else:
            self.F = ReleasedNet(run.model.net)
            self.F_teacher = ReleasedNet(run.teacher.net)
            self.target = copy.deepcopy(run.model).requires_grad_(False)
            self.F_target = ReleasedNet(self.target.net)
            self.step = self._student

    def _batch(self) -> dict:
        try:
            batch = next(self.it)
        except StopIteration:
            self.it = iter(self.loader)
            batch = next(self.it)
        return {k: (v * self.norm[k][0] + self.norm[k][1]) for k, v in batch.items()}  # normalizer.normalize

    def _finish(self, loss: torch.Tensor, ema=None) -> None:
        run = self.run
        loss.backward()
        run.opt.step()
        run.opt.zero_grad()
        run.sched.step()
        self.n += 1
        if ema is not None:
            ema_model_step(ema, run.model, ema_decay(self.n))
        loss.item()

    def _teacher(self) -> None:
        b = self._batch()
        nact, nobs = b["actions"], b["observations"]
        cond = nobs[:, :1].reshape(nact.shape[0], -1)
        inpainting_mask(nact.shape, nact.shape[-1])
        times = (torch.randn((nact.shape[0],)) * 1.2 - 1.2).exp()
        noisy = nact + torch.randn(nact.shape) * append_dims(times, nact.ndim)
        pred = calc_out(self.F, noisy, times, cond)
        self._finish(huber(pred, nact, karras_weights(times)), self.run.ema)

    def _times(self, b: int):
        t = torch.randint(0, BINS, (b,)).long()
        s = torch.cat([torch.randint(int(t_i.item()), BINS + 1, (1,)) for t_i in t])
        u = torch.cat([torch.randint(int(t_i.item()), int((s_i + 1).item()), (1,)) for t_i, s_i in zip(t, s)])
        maxes = t + 1
        mask = (u > maxes).float()
        return t, s, u * (1 - mask) + maxes * mask

    @torch.no_grad()
    def _heun(self, x, t, u, cond):
        ct = torch.stack([(t_i + 0).clamp(int(t_i.item()), int(u_i.item())) for t_i, u_i in zip(t, u)])
        nt = torch.stack([(t_i + 1).clamp(int(t_i.item()), int(u_i.item())) for t_i, u_i in zip(t, u)])
        cur, nxt = timesteps_to_times(ct), timesteps_to_times(nt)
        step = append_dims(nxt - cur, x.ndim)
        dy = (x - calc_out(self.F_teacher, x, cur, cond)) / append_dims(cur, x.ndim)
        y_next = x + step * dy
        dy_next = (y_next - calc_out(self.F_teacher, y_next, nxt, cond)) / append_dims(nxt, x.ndim)
        return x + step * (dy + dy_next) / 2

    def _student(self) -> None:
        d = self.cfg.distill
        b = self._batch()
        nact, nobs = b["actions"], b["observations"]
        n = nact.shape[0]
        cond = nobs[:, :1].reshape(n, -1)
        inpainting_mask(nact.shape, nact.shape[-1])
        t, s, u = self._times(n)
        times, stops, u_times = timesteps_to_times(t), timesteps_to_times(s), timesteps_to_times(u)
        noise_traj = nact + torch.randn(nact.shape) * append_dims(times, nact.ndim)
        u_traj = self._heun(noise_traj, t, u, cond)
        pred = ctm_calc_out(self.F, noise_traj, times, stops, cond)
        target = ctm_calc_out(self.F_target, u_traj, u_times, stops, cond)
        start = torch.tensor([SIGMA_MIN]).expand(times.shape)
        pred = ctm_calc_out(self.F_target, pred, stops, start, cond)
        target = ctm_calc_out(self.F_target, target, stops, start, cond)
        losses = {"ctm": huber(pred, target) * d.alpha}
        half = int(math.ceil(n / 2))
        xi = torch.rand((half,)) * 0.7
        top = ((SIGMA_MAX ** (1 / RHO) + xi * (SIGMA_MIN ** (1 / RHO) - SIGMA_MAX ** (1 / RHO))) ** RHO).clamp(
            SIGMA_MIN, SIGMA_MAX)
        times = torch.cat([top, (torch.randn((n - half,)) * 1.2 - 1.2).exp()])
        noisy = nact + torch.randn(nact.shape) * append_dims(times, nact.ndim)
        stop = torch.tensor([SIGMA_MIN]).expand(times.shape)
        pred = ctm_calc_out(self.F, noisy, times, stop, cond)
        losses["dsm"] = huber(pred, nact, karras_weights(times)) * d.beta
        if self.run.reward_model is not None:
            losses["rwd"] = -self.run.reward_model(nobs[:, 0], pred[:, 0]).mean() * d.sigma
        loss = 0
        for v in losses.values():
            v.item()
            loss = loss + v
        self._finish(loss)
        with torch.no_grad():  # model.ema_update(): decay 0 (initial_ema_decay 0.0)
            params, targets = [p.data for p in self.run.model.parameters()], [p.data for p in self.target.parameters()]
            torch._foreach_mul_(targets, 0.0)
            torch._foreach_add_(targets, params, alpha=1.0)

    def _reward(self) -> None:
        b = self._batch()
        nobs, nact, nrew = b["observations"], b["actions"], b["rewards"]
        pred = self.run.model(nobs.reshape(-1, nobs.shape[-1]), nact.reshape(-1, nact.shape[-1]))
        loss = F.mse_loss(pred.reshape(-1, 1), nrew.reshape(-1, 1), reduction="none").mean()
        self._finish(loss, self.ema)

    def _bc(self) -> None:
        idx = np.random.randint(0, len(self.buffer[0]), size=self.cfg.batch)
        states, actions, _, _, _ = [a[idx] for a in self.buffer]
        loss = F.mse_loss(self.run.model(states), actions)
        opt = self.run.opt
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss.item()
