"""What the Ray commands print: a console a person reads (progress bars, one line per finished stage and per
trial checkpoint), with `--verbose` bringing Ray's own detail back.

- Worker-side step loops draw no progress bar (a bar redrawn in a worker reaches the driver as one forwarded
  line per redraw, and Ray's tqdm leaves a stale bar per worker where the output is not a terminal); a run
  outside Tune prints one line per checkpoint (`checkpoint_line`), Tune trials one line per checkpoint from
  the driver (`trial_lines`).
- Ray Train's per-report INFO line ("Reporting training result ...", logged on a logger named by its file, so
  under the root logger) and the library's INFO logs are turned down in the workers (`quiet_worker`); warnings
  and errors still reach the console.
- Tune prints no status tables (`RunConfig(verbose=0)` with Tune's older reporter, RAY_AIR_NEW_OUTPUT=0: the
  newer one prints its experiment header even at verbosity 0); `trial_lines` prints one line per trial checkpoint
  (trial, alpha, beta, sigma, step, select_score) and one per finished trial.
- A local Ray instance started by the command runs without Ray Train's preemption watcher (`local_env`): it
  watches for spot-node preemption, which a single machine has none of, and its start-up printed a
  core_worker error line per trial. On a cluster it stays on.
"""

from __future__ import annotations

import logging
import math

VERBOSE = {"value": False}

# Ray Train's preemption watcher switch (ray.train.v2._internal.constants.ENABLE_PREEMPTION_WATCHER_ENV_VAR)
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def set_verbose(verbose: bool) -> None:
    """--verbose: Tune's status tables, Ray Train's report lines and the library's INFO logs come back."""
    import os

    VERBOSE["value"] = bool(verbose)
    if not verbose:
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
        try:
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)
        except ImportError:
            pass


def verbose() -> bool:
    return VERBOSE["value"]


def local_env() -> dict[str, str]:
    """Environment of the processes of a Ray instance the command starts itself (one machine)."""
    return {PREEMPTION_WATCHER_ENV: "0"}


def quiet_worker(verbose: bool) -> None:
    """In a Ray Train worker: Ray Train's per-report INFO line and the library's INFO logs off (unless verbose)."""
    if verbose:
        return
    for name in ("", "ray.train", "ractd"):
        logging.getLogger(name).setLevel(logging.WARNING)


def quiet_teardown() -> None:
    """In a Tune trial's process: Ray ends a finished trial's actor with SIGTERM, whose handler raises SystemExit;
    when that lands inside a garbage-collection callback, Python prints "Exception ignored in ..." with a
    traceback (seen on the multi-node cluster, three per finished trial). Those -- SystemExit only -- are dropped;
    every other unraisable exception is printed as before."""
    import sys

    default = sys.unraisablehook

    def hook(unraisable):
        if isinstance(unraisable.exc_value, SystemExit):
            return
        default(unraisable)

    sys.unraisablehook = hook


def checkpoint_line(stage: str, metrics: dict, total: int) -> str:
    """One line per checkpoint of a Ray Train run outside Tune (the shared teacher and reward model)."""
    terms = " ".join(f"{k}={_fmt(float(metrics[k]))}" for k in ("loss", "select_score") if metrics.get(k) is not None)
    return f"{stage}: step {int(metrics.get('step', 0))}/{total} {terms}"


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) and math.isfinite(v) else str(v)


def trial_lines(total_steps: int):
    """A Tune callback printing one line per checkpoint report and one per finished trial (driver side)."""
    from ray import tune

    class TrialLines(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            if not result.get("at_checkpoint") or result.get("select_score") is None:  # the loss reports: logs only
                return
            c = trial.config
            print(f"  trial {trial.trial_id}  alpha={_fmt(c.get('alpha'))} beta={_fmt(c.get('beta'))} "
                  f"sigma={_fmt(c.get('sigma'))}  step {int(result.get('step', 0))}/{total_steps}  "
                  f"select_score={_fmt(float(result['select_score']))}", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            last = trial.last_result or {}
            step = int(last.get("step", 0))
            how = "finished" if step >= total_steps else f"stopped by ASHA at step {step}"
            print(f"  trial {trial.trial_id} {how} ({_fmt(float(last.get('time_total_s', math.nan)))} s)", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            print(f"  trial {trial.trial_id} failed (details: --verbose, or the trial's error.txt)", flush=True)

    return TrialLines()


def tracking_callbacks(log_to: str, task: str) -> list:
    """Tune's MLflow or W&B logger callback (SearchConfig.log_to), [] for none. A package that is not installed is
    a RactdError (one line) saying which."""
    import importlib.util

    from ractd import RactdError

    if not log_to:
        return []
    package = {"mlflow": "mlflow", "wandb": "wandb"}[log_to]
    if importlib.util.find_spec(package) is None:
        raise RactdError(f"--log-to {log_to}: the {package} package is not installed (pip install {package})")
    if log_to == "mlflow":
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        return [MLflowLoggerCallback(experiment_name=f"ractd-{task}", save_artifact=False)]
    from ray.air.integrations.wandb import WandbLoggerCallback

    return [WandbLoggerCallback(project="ractd", group=task)]
