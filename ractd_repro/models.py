"""The models a study needs: which checkpoint each method samples, where it is, and how to train it.

Checkpoints. Each method needs a model (ModelPlan): reward, teacher, ddpm, ctd, ractd, sigma-S, ra-teacher,
ra-teacher-ctd, ra-teacher-ractd, bc; ctd-final and ractd-final are files their student's training writes. Models live
under ractd.paths.runs_dir()/study/<task>-<study name>/<model>/ <stage>/best.pt, except that when the sweep has run,
RACTD is the sweep's best checkpoint, the teacher and
reward model are the ones it distilled from (best_config.json), so the study's other students distill from the
same teacher, and CTD is the sweep's completed trial at alpha = beta = 1, sigma = 0 when there is one. A model
whose training config equals another's (e.g. maze2d RACTD with sigma = 0 and CTD) shares its checkpoint. A missing
checkpoint is trained with `ensure_models(study, trainer)` (ractd.train.train by default; eval/reproduce_tables.py
passes Ray Train when a cluster is there) or reported
with the exact `python -m ractd ...` command that trains it (`ModelPlan.command`); its cells are marked missing
and no number is ever made up for them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shlex
from pathlib import Path
from typing import Callable

from ractd import RactdError
from ractd.tasks import get_task
from ractd_repro import records
from ractd_repro.methods import get_method
from ractd_repro.spec import Study, expand_methods, study_root, task_sigmas

log = logging.getLogger(__name__)


def run_finished(stage_dir: Path) -> bool:
    """Whether the training run in `stage_dir` (ractd.train's layout: config.json, metrics.jsonl with a line per
    checkpoint, the last at the final step) reached the steps its config.json names. A folder without those files
    (a checkpoint put there by other means) counts as finished."""
    config, metrics = stage_dir / "config.json", stage_dir / "metrics.jsonl"
    if not (config.is_file() and metrics.is_file()):
        return True
    steps = json.loads(config.read_text()).get("steps")
    lines = [line for line in metrics.read_text().split("\n") if line.strip()]
    try:
        last = int(json.loads(lines[-1]).get("step", 0)) if lines else 0
    except ValueError:  # a line cut off mid-write: the run stopped there
        return False
    return steps is None or last >= int(steps)


@dataclasses.dataclass(frozen=True)
class ModelPlan:
    """One checkpoint a study needs: where it is (or will be) and how to train it.

    cfg: the TrainConfig that trains it (None for a checkpoint taken from the sweep). source: "study" or "sweep".
    deps: names of the models that must exist before it can be trained (teacher, reward).
    copies: (source, destination) files put in place before training: the reward-aware teacher reads its
        reward model from <run_dir>/reward/best.pt (`train-teacher` takes no --reward-ckpt), so the study's
        reward checkpoint is copied there.
    final_of: for a final checkpoint (ctd-final, ractd-final), the model whose training writes it (not trained
        on its own).
    """

    task: str
    name: str
    stage: str
    checkpoint: Path
    cfg: object | None
    source: str = "study"
    deps: tuple[str, ...] = ()
    copies: tuple[tuple[Path, Path], ...] = ()
    final_of: str = ""

    @property
    def exists(self) -> bool:
        """The checkpoint is there and, for a model this study trains, its run reached its steps (`run_finished`:
        a run cut short leaves a best.pt too, which must be resumed, not evaluated). A sweep's checkpoints are
        taken as the sweep left them (ASHA ends trials early by design)."""
        if not self.checkpoint.is_file():
            return False
        if self.source != "study":
            return True
        folder = self.checkpoint.parent
        return run_finished(folder.parent if folder.name == "latest" else folder)

    @property
    def sigma(self) -> float:
        if self.cfg is not None and self.stage == "student":
            return float(self.cfg.resolved().distill.sigma)
        return float("nan")

    def command(self, budget: str) -> str:
        """The `python -m ractd ...` command that trains this checkpoint (same config as `cfg`)."""
        if self.cfg is None:
            return f"# {self.checkpoint} comes from the sweep: python tune/search.py --task {self.task}"
        pre = [f"mkdir -p {shlex.quote(str(dst.parent))} && cp {shlex.quote(str(src))} {shlex.quote(str(dst))}"
               for src, dst in self.copies]
        return " && ".join(pre + [train_command(self.cfg, budget)])

    def put_copies(self) -> None:
        from ractd.checkpoint import copy_checkpoint

        for src, dst in self.copies:
            if not dst.is_file():
                copy_checkpoint(src, dst)


_STAGE_COMMAND = {"reward": "train-reward", "teacher": "train-teacher", "ddpm": "train-ddpm", "student": "distill",
                  "bc": "train-bc"}


def train_command(cfg, budget: str) -> str:
    """The command line whose config equals `cfg`: the stage's command, the budget flag, then one flag per field
    that differs from the budget's default (flags as ractd.cli generates them from the dataclasses)."""
    from ractd.config import _flag
    from ractd.train import TrainConfig

    base = TrainConfig.for_stage(cfg.stage, budget, task=cfg.task)
    argv = ["python", "-m", "ractd", _STAGE_COMMAND[cfg.stage], "--task", cfg.task]
    argv += {"quick": ["--quick"], "paper": ["--paper"]}.get(budget, [])
    top = {f.name for f in dataclasses.fields(TrainConfig)}

    def emit(name: str, value, default, nested: bool):
        if value == default:
            return
        flag = _flag(f"distill_{name}" if nested and name in top else name)
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, tuple):
            argv.extend([flag, *map(str, value)])
        else:
            argv.extend([flag, str(value)])

    for f in dataclasses.fields(TrainConfig):
        if f.name in ("task", "stage"):
            continue
        value, default = getattr(cfg, f.name), getattr(base, f.name)
        if dataclasses.is_dataclass(value):
            for sub in dataclasses.fields(value):
                emit(sub.name, getattr(value, sub.name), getattr(default, sub.name), nested=True)
        else:
            emit(f.name, value, default, nested=False)
    return shlex.join(argv)


def inverse_dynamics_path(study: Study, task: str) -> Path:
    """The inverse dynamics model the study's maze2d planner uses (the one `evaluate --tracker
    inverse_dynamics` loads for a checkpoint of this data scale)."""
    from ractd.inverse_dynamics import default_path

    return default_path(task, study.data_scale)


def ensure_inverse_dynamics(study: Study) -> list[Path]:
    """Train the inverse dynamics model of every task with an inverse-dynamics method when it is missing (about a
    minute on a CPU for the default config); returns the files written."""
    from ractd.data.d4rl import load_dataset
    from ractd.inverse_dynamics import train_inverse_dynamics

    written = []
    for task in study.tasks:
        path = inverse_dynamics_path(study, task)
        if path.is_file() or not any(get_method(m).tracker != "pd" for m in expand_methods(study, task)):
            continue
        log.info("training the inverse dynamics model of %s -> %s", task, path)
        train_inverse_dynamics(load_dataset(get_task(task), scale=study.data_scale), out=path, progress=True)
        written.append(path)
    return written


def _best(study: Study, task: str) -> records.BestConfig | None:
    return records.SweepFolder.of(task, study.data_scale).read_best()


def ractd_weights(study: Study, task: str) -> tuple[float, float, float, str]:
    """(alpha, beta, sigma, where from) of the task's RACTD student: the sweep's best, else Table 9."""
    best = _best(study, task)
    if best is not None:
        return float(best.alpha), float(best.beta), float(best.sigma), "sweep"
    w = get_task(task).weights
    return w.alpha, w.beta, w.sigma, "Table 9"


def _sweep_models(study: Study, task: str, best: records.BestConfig) -> dict[str, ModelPlan]:
    """The models the task's sweep provides: its best student (RACTD), the teacher and reward model it distilled
    from, and its completed trials at CTD's point (alpha = beta = 1, sigma = 0) and at each sigma of the study."""
    from ractd.checkpoint import load_checkpoint

    models: dict[str, ModelPlan] = {}
    ck_cfg = load_checkpoint(Path(best.checkpoint))["config"]
    models["ractd"] = ModelPlan(task, "ractd", "student", Path(best.checkpoint), None, source="sweep")
    for up in ("teacher", "reward"):  # best_config.json names them; else the student's own config does
        p = getattr(best, up) or ck_cfg.get(f"{up}_ckpt") or ""
        if p and Path(p).is_file():
            models[up] = ModelPlan(task, up, up, Path(p), None, source="sweep")
    if "teacher" in models:
        points = [("ctd", (1.0, 1.0, 0.0))] + [(f"sigma-{x:g}", (best.alpha, best.beta, float(x)))
                                               for x in task_sigmas(study, task)]
        trials = records.SweepFolder.of(task, study.data_scale).completed_students(wanted=[w for _, w in points])
        for name, (a, b, s) in points:
            found = trials.get((float(a), float(b), float(s)))
            if found is not None:
                models[name] = ModelPlan(task, name, "student", found, None, source="sweep")
    return models


def plan_models(study: Study, task: str) -> dict[str, ModelPlan]:
    """Every model the task's methods need (and their dependencies), keyed by model name: the sweep's where it
    has run (`_sweep_models`), the others trained by this study under study_root."""
    from ractd.train import TrainConfig

    root = study_root(study, task)
    alpha, beta, sigma, _ = ractd_weights(study, task)
    needed = {get_method(m).model for m in expand_methods(study, task)}
    best = _best(study, task)
    models = _sweep_models(study, task, best) if best is not None and Path(best.checkpoint).is_file() else {}

    def add(name: str, stage: str, deps: tuple[str, ...] = (), copies=(), **kw) -> None:
        if study.preset:
            kw["preset"] = study.preset
        if study.max_train_steps:
            kw["steps"] = min(study.max_train_steps, TrainConfig.for_stage(stage, study.budget).steps)
        cfg = TrainConfig.for_stage(stage, study.budget, task=task, run_dir=str(root / name),
                                    scale=study.data_scale, **kw)
        models[name] = ModelPlan(task, name, stage, Path(cfg.run_dir) / stage / "best.pt", cfg, deps=deps,
                                 copies=tuple(copies))

    if "reward" not in models and get_task(task).kind == "locomotion":
        add("reward", "reward")
    if "teacher" not in models:
        add("teacher", "teacher")
    reward_ckpt = str(models["reward"].checkpoint) if "reward" in models else ""

    def student(name: str, a: float, b: float, s: float, teacher: str) -> None:
        if name not in needed or name in models:
            return
        distill = dataclasses.replace(TrainConfig.for_stage("student", study.budget).distill, alpha=a, beta=b, sigma=s)
        add(name, "student", (teacher,) + (("reward",) if s > 0 else ()), distill=distill,
            teacher_ckpt=str(models[teacher].checkpoint), reward_ckpt=reward_ckpt if s > 0 else "")

    for stage in ("ddpm", "bc"):
        if stage in needed:
            add(stage, stage, **(_teacher_sizes(models["teacher"]) if stage == "ddpm" else {}))
    if "bc-10" in needed:
        add("bc-10", "bc", bc_top_fraction=0.1)
    student("ctd", 1.0, 1.0, 0.0, "teacher")
    student("ractd", alpha, beta, sigma, "teacher")
    for s in task_sigmas(study, task):
        student(f"sigma-{s:g}", alpha, beta, float(s), "teacher")
    if needed & {"ra-teacher-ctd", "ra-teacher-ractd"}:
        w = study.ra_teacher_weight if study.ra_teacher_weight >= 0 else (sigma if sigma > 0 else 1.0)
        add("ra-teacher", "teacher", ("reward",), reward_aware_teacher=float(w),
            copies=[(Path(reward_ckpt), root / "ra-teacher" / "reward" / "best.pt")])
        student("ra-teacher-ctd", 1.0, 1.0, 0.0, "ra-teacher")
        student("ra-teacher-ractd", alpha, beta, sigma, "ra-teacher")
    models = _share_identical(models)
    return {**models, **_final_models(task, models, needed, best)}


def _teacher_sizes(teacher: ModelPlan) -> dict:
    """The DDPM baseline's steps and batch: its teacher's (Table 11 compares the samplers of models trained alike).
    A sweep's teacher may have its own (tune/search.py --teacher-steps / --teacher-batch); the study's own teacher
    has the budget's, as the DDPM has. {} when there is nothing to read."""
    if teacher.cfg is not None or not teacher.checkpoint.is_file():
        return {}
    from ractd.checkpoint import load_checkpoint

    cfg = load_checkpoint(teacher.checkpoint)["config"]
    return {k: int(cfg[k]) for k in ("steps", "batch") if k in cfg}


def _final_models(task: str, models: dict[str, ModelPlan], needed: set[str], best: records.BestConfig | None
                  ) -> dict[str, ModelPlan]:
    """ctd-final, ractd-final: the final checkpoint beside each selected best.pt (ractd.train's run layout)."""
    out = {}
    for base in ("ctd", "ractd"):
        if f"{base}-final" in needed and base in models:
            b = models[base]
            best_pt = b.checkpoint
            if base == "ractd" and b.source == "sweep" and best and best.trial_checkpoint:
                best_pt = Path(best.trial_checkpoint)  # best/checkpoint.pt is a copy; its run is the trial's
            final = records.SweepFolder.final_beside(best_pt)
            out[f"{base}-final"] = ModelPlan(task, f"{base}-final", "student", final, None, source=b.source,
                                             deps=(base,), final_of=base)
    return out


def _share_identical(models: dict[str, ModelPlan]) -> dict[str, ModelPlan]:
    """A model whose training config equals an earlier one's (up to run_dir) uses that model's checkpoint."""
    seen: dict[str, ModelPlan] = {}
    out: dict[str, ModelPlan] = {}
    for name, m in models.items():
        if m.cfg is None:
            out[name] = m
            continue
        key = json.dumps(dataclasses.asdict(dataclasses.replace(m.cfg, run_dir="")), sort_keys=True, default=str)
        if key in seen:
            first = seen[key]
            out[name] = dataclasses.replace(first, name=name)
            log.info("%s: %s has the same training config as %s; they share %s", m.task, name, first.name,
                     first.checkpoint)
        else:
            seen[key] = m
            out[name] = m
    return out


Trainer = Callable[[object], None]


def train_locally(cfg) -> None:
    """Train one stage in this process with ractd.train.train (progress bar on)."""
    from ractd.train import RunContext, train

    train(cfg, RunContext(progress=True))


_STAGE_ORDER = {"reward": 0, "bc": 0, "teacher": 1, "ddpm": 1, "student": 2}


def ensure_models(study: Study, trainer: Trainer = train_locally) -> list[ModelPlan]:
    """Train every missing checkpoint of the study in dependency order (reward, teachers, students); returns
    the models trained. A model is trained once even when several names share it."""
    trained: list[ModelPlan] = []
    for task in study.tasks:
        models = plan_models(study, task)
        unique: dict[Path, ModelPlan] = {}
        for m in models.values():
            unique.setdefault(m.checkpoint, m)  # a shared checkpoint is trained once, under its first name
        order = sorted(unique.values(),
                       key=lambda m: (_STAGE_ORDER[m.stage], m.name != "teacher", m.name))
        for m in order:
            if m.exists or m.final_of:  # a final checkpoint comes with its student's training
                continue
            if m.cfg is None:
                raise RactdError(f"{m.checkpoint} (from the sweep) is missing; rerun tune/search.py --task {task}")
            for dep in m.deps:
                if not models[dep].exists:
                    raise RactdError(f"{task}/{m.name} needs {models[dep].checkpoint}, which training did not write")
            log.info("training %s/%s (%s, %d steps)", task, m.name, m.stage, m.cfg.steps)
            m.put_copies()
            trainer(m.cfg)
            if not m.exists:
                raise RactdError(f"training {task}/{m.name} finished without writing {m.checkpoint}")
            trained.append(m)
    ensure_inverse_dynamics(study)
    return trained


def sweep_usage_lines(study: Study) -> list[str]:
    """One line per task: which models come from the task's sweep at the study's data scale (its best student as
    RACTD, its alpha = beta = 1, sigma = 0 trial as CTD, its teacher and reward model) and which are trained here."""
    from ractd.paths import sweep_dir

    lines = []
    for task in study.tasks:
        best = _best(study, task)
        d = sweep_dir(task, study.data_scale)
        if best is None:
            lines.append(f"{task}: no sweep at scale {study.data_scale} ({d}): RACTD at the Table 9 weights, every "
                         f"model from this study")
            continue
        models = plan_models(study, task)
        used = sorted(n for n, m in models.items() if m.source == "sweep")
        own = sorted(n for n, m in models.items() if m.source != "sweep")
        lines.append(f"{task}: from the sweep {d} (best trial {best.trial_id or '?'}: alpha={best.alpha:.4g} "
                     f"beta={best.beta:.4g} sigma={best.sigma:.4g}): {', '.join(used) or 'nothing'}"
                     + (f"; from this study: {', '.join(own)}" if own else ""))
    return lines
