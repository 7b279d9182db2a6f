"""`cpo-ray sweep`: a hyperparameter search with Ray Tune, each trial a Ray Train TorchTrainer over the SAME
prepared data, a scheduler (ASHA) stopping the trials that fall behind on a held-out metric.

    cpo-ray sweep --config configs/tiny-cpu-sweep.yaml
    sweep:
      params: {train.beta: [0.05, 0.1, 0.5], train.lr: "loguniform(1e-4, 1e-2)"}   # grid x random
      samples: 2            # random draws per grid point
      metric: eval/accuracy # reported at each held-out evaluation (train.eval_every)

Prepare runs once (<output_dir>/data); trial t trains in <output_dir>/trials/<t>/ (its own run name, metrics,
checkpoints). Each trial reports its held-out metric at every evaluation through Ray Tune's TuneReportCallback;
ASHA (Li et al. 2020) stops the ones below the best at each rung of grace_period x reduction_factor^k steps.
max_concurrent_trials defaults to what the cluster's CPUs (GPUs) hold. The result: a trials table on the console
and in sweep.json / report.html (one held-out curve per trial), the best trial's model copied to
<output_dir>/final (and adapter/), served and evaluated against the base like a pipeline run when
sweep.evaluate_best. A stopped sweep resumes (Tuner.restore) with the same command.
"""

from __future__ import annotations

import ast
import json
import math
import re
import time

from cpo_ray import console
from cpo_ray.config import Config, ConfigError, apply_overrides
from cpo_ray.contract import FINAL_MARKER, RunPaths
from cpo_ray.storage import Location

SPACE = re.compile(r"^(uniform|loguniform|randint|choice)\((.*)\)$")


def search_space(params: dict) -> dict:
    """sweep.params -> a Tune param_space keyed by dotted config keys: lists are grids, "loguniform(a, b)",
    "uniform(a, b)", "randint(a, b)" and "choice([...])" are sampled (as tune's functions of the same names)."""
    from ray import tune

    space = {}
    for key, spec in params.items():
        if isinstance(spec, list):
            space[key] = tune.grid_search(spec)
            continue
        m = SPACE.match(str(spec).strip())
        if not m:
            raise ConfigError(
                f"sweep.params.{key}: {spec!r} is neither a list (grid) nor uniform/loguniform/randint/choice(...)"
            )
        # Python literals, not YAML: YAML 1.1 reads "1e-5" as a string
        fn, args = m.group(1), ast.literal_eval(f"[{m.group(2)}]")
        space[key] = getattr(tune, fn)(*args)
    return space


def trial_config(cfg: Config, overrides: dict, trial: str) -> Config:
    """A trial's config: the sweep's with the trial's values, its own folder and run name, the sweep's prepared
    data, held-out evaluations as the reports the scheduler reads."""
    tree = apply_overrides(cfg.model_dump(mode="json"), [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
    tree.pop("sweep", None)
    if cfg.serve.max_model_len == cfg.data.max_length + max(1, cfg.eval.max_new_tokens):
        tree["serve"]["max_model_len"] = None  # derived, not set: derive it again from the trial's lengths
    tc = Config.model_validate(tree)
    paths = RunPaths.of(cfg)
    tc.name, tc.output_dir = f"{cfg.name}-{trial}", (paths.output_dir / "trials" / trial).uri
    tc.local_dir = str(paths.local_dir / "trials" / trial)
    tc.data.output_dir = paths.data_dir.uri
    # Every report to Tune must carry the metric: report at the evaluations, checkpoint only on them.
    tc.train.report_every = tc.train.eval_every
    if tc.train.checkpoint_every:
        tc.train.checkpoint_every = -(-tc.train.checkpoint_every // tc.train.eval_every) * tc.train.eval_every
    return tc


def _trial(config: dict) -> None:
    """Tune's function trainable: one TorchTrainer run whose reports reach the scheduler."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from cpo_ray.train.trainer import run_training

    cfg = Config.model_validate(config["cfg"])
    trial = tune.get_context().get_trial_id()
    run_training(trial_config(cfg, config["params"], trial), config["model_path"], callbacks=[TuneReportCallback()])


def run_sweep(cfg: Config) -> dict:
    """Prepare once, run the trials under the scheduler, pick the best; returns sweep.json's dict."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from cpo_ray.model_source import resolve_model_path
    from cpo_ray.pipeline import stage_prepare

    if cfg.sweep is None or not cfg.sweep.params:
        raise ConfigError("cpo-ray sweep needs a sweep: section with params (e.g. {train.beta: [0.05, 0.1]})")
    cfg = RunPaths.anchored(cfg)
    sw, paths = cfg.sweep, RunPaths.of(cfg)
    if not cfg.train.eval_every:
        raise ConfigError("sweep: train.eval_every must be > 0 (the scheduler compares held-out evaluations)")
    import ray

    trials_at_once = concurrency(cfg, ray.cluster_resources())  # refused before the data is prepared
    if not paths.prepare_report.is_file():
        with console.stage("prepare"):
            stage_prepare(cfg)
    model_path = resolve_model_path(cfg)
    metric, mode = sw.metric.replace("heldout/", "eval/", 1), sw.mode
    scheduler = (ASHAScheduler(time_attr="step", max_t=_max_steps(cfg), grace_period=sw.grace_period,
                               reduction_factor=sw.reduction_factor)
                 if sw.scheduler == "asha" else FIFOScheduler())  # fmt: skip
    trainable = tune.with_resources(_trial, {"cpu": 0.01})  # the trainer's workers hold the CPUs, not the trial
    space = {"cfg": cfg.model_dump(mode="json"), "model_path": model_path, "params": search_space(sw.params)}
    store, name = paths.output_dir / "tune", "sweep"
    run_config = tune.RunConfig(name=name, storage_path=store.path, storage_filesystem=store.fs, verbose=0)
    if tune.Tuner.can_restore(f"{store.path}/{name}", storage_filesystem=store.fs):
        console.say("resuming the sweep from its Tune state")
        tuner = tune.Tuner.restore(f"{store.path}/{name}", trainable=trainable, resume_unfinished=True,
                                   param_space=space, storage_filesystem=store.fs)  # fmt: skip
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=metric,
                mode=mode,
                scheduler=scheduler,
                num_samples=sw.samples,
                max_concurrent_trials=trials_at_once,
            ),  # fmt: skip
            run_config=run_config,
        )
    t0 = time.time()
    with console.stage("sweep"):
        grid = tuner.fit()
    return _summarize(cfg, grid, metric, mode, round(time.time() - t0, 1))


def _max_steps(cfg: Config) -> int:
    from cpo_ray.data.prepare import count_rows
    from cpo_ray.train.microbatches import total_steps

    paths = RunPaths.of(cfg)
    return total_steps(cfg.train, count_rows(paths.split_dir("train")), cfg.train.num_workers)


def concurrency(cfg: Config, resources: dict) -> int:
    """Trials that run at once: sweep.max_concurrent_trials, else what the cluster's CPUs (GPUs) hold. Each trial
    needs its workers' CPUs plus ONE whole CPU left for its Ray Data reads: Ray Data 2.60 splits the CPUs the
    trainers leave among the running datasets in whole units, so two trials sharing one free CPU get zero each
    and wait for their first batch forever. A concurrency that cannot fit is refused before any trial starts.
    `resources`: the cluster's, as ray.cluster_resources() gives them."""
    tc, res = cfg.train, resources
    cpus, per_trial = res.get("CPU", 1), tc.num_workers * tc.cpus_per_worker + 1
    fit = int(cpus // per_trial)
    if tc.use_gpu:
        fit = min(fit, int(res.get("GPU", 0) // tc.num_workers))
    asked = cfg.sweep.max_concurrent_trials
    if asked and asked * per_trial > cpus:
        raise ConfigError(
            f"sweep.max_concurrent_trials={asked}: each trial needs train.num_workers x train.cpus_per_worker "
            f"= {per_trial - 1:g} CPUs plus 1 CPU for its data reads ({per_trial:g}), {asked * per_trial:g} in "
            f"all, and the cluster has {cpus:g}: at most {max(1, fit)} at once (Ray Data would never get a CPU)"
        )
    return asked or max(1, fit)


def _grid_size(sw) -> int:
    """Trials the sweep runs in all: the grid's points times sweep.samples."""
    return math.prod(len(v) for v in sw.params.values() if isinstance(v, list)) * sw.samples


def _summarize(cfg: Config, grid, metric: str, mode: str, seconds: float) -> dict:
    """The trials table (config, steps run, best metric, stopped early or not), the best trial's export copied to
    the sweep's final/ and adapter/, sweep.json."""
    from cpo_ray.compat import tune_trial_statuses

    paths, max_steps, sw = RunPaths.of(cfg), _max_steps(cfg), cfg.sweep

    def finished(status: str, steps: int, error) -> bool:
        # An interrupted sweep (Ctrl-C, a stopped job) ends its running trials TERMINATED too; the scheduler
        # stops none before sweep.grace_period steps, and with scheduler none it stops none at all.
        early_stop_possible = sw.scheduler == "asha" and steps >= sw.grace_period
        return status in ("TERMINATED", "ERROR") and (error is not None or steps >= max_steps or early_stop_possible)

    trials = []
    for result, status in zip(grid, tune_trial_statuses(grid), strict=True):
        df = result.metrics_dataframe
        history = [] if df is None or metric not in df else df[["step", metric]].dropna().values.tolist()
        values = [v for _, v in history]
        best = (max if mode == "max" else min)(values) if values else None
        steps = int(result.metrics.get("step", 0)) if result.metrics else 0
        trial = (result.metrics or {}).get("trial_id", "?")
        done = finished(status, steps, result.error)
        trials.append({
            "trial": trial,
            "params": result.config["params"],
            "steps": steps,
            "best": best,
            "last": values[-1] if values else None,
            "finished": done,  # else interrupted: the same command resumes it
            "stopped_early": done and not result.error and steps < max_steps,
            "error": None if result.error is None else str(result.error).splitlines()[0][:300],
            "history": history,
            "output_dir": trial_config(cfg, result.config["params"], trial).output_dir,
        })  # fmt: skip
    # trials unfinished or never started: an interrupted sweep picks nothing until it is resumed
    unfinished = sum(not t["finished"] for t in trials) + _grid_size(sw) - len(trials)
    ran = [t for t in trials if t["best"] is not None and t["finished"] and not t["stopped_early"] and not t["error"]]
    best = (max if mode == "max" else min)(ran, key=lambda t: t["best"]) if ran and not unfinished else None
    out = {"metric": metric, "mode": mode, "max_steps": max_steps, "seconds": seconds, "trials": trials,
           "unfinished": unfinished, "best": best and {k: best[k] for k in ("trial", "params", "best", "output_dir")}}  # fmt: skip
    if best:
        src = Location(best["output_dir"])
        for part, marker in (("final", FINAL_MARKER), ("adapter", "adapter_config.json")):
            if (src / part / marker).is_file():
                import tempfile

                with tempfile.TemporaryDirectory() as tmp:
                    (paths.output_dir / part).publish_from((src / part).download_to(tmp), marker=marker)
    (paths.output_dir / "sweep.json").write_text(json.dumps(out, indent=2))
    return out


def trials_table(out: dict) -> str:
    """The console's table: one row per trial."""
    keys = sorted({k for t in out["trials"] for k in t["params"]})
    head = ["trial", *keys, "steps", f"best {out['metric']}", "stopped early"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in sorted(
        out["trials"],
        key=lambda t: (t["best"] is None, -(t["best"] or 0) if out["mode"] == "max" else (t["best"] or 0)),
    ):
        best = "-" if t["best"] is None else f"{t['best']:.4f}"
        flag = "error" if t["error"] else "unfinished" if not t["finished"] else "yes" if t["stopped_early"] else "no"
        mark = " (best)" if out["best"] and t["trial"] == out["best"]["trial"] else ""
        vals = [
            f"{t['params'][k]:.4g}" if isinstance(t["params"].get(k), float) else str(t["params"].get(k)) for k in keys
        ]
        lines.append("| " + " | ".join([t["trial"] + mark, *vals, str(t["steps"]), best, flag]) + " |")
    return "\n".join(lines)


def write_sweep_report(cfg: Config, out: dict) -> Location:
    """report.html of the sweep: the trials table and one held-out curve per trial."""
    import base64
    import html
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for t in out["trials"]:
        if t["history"]:
            xs, ys = zip(*t["history"], strict=True)
            label = ", ".join(
                f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                for k, v in t["params"].items()
            )
            ax.plot(
                xs,
                ys,
                marker="o",
                ls="--" if t["stopped_early"] else "-",
                label=label + (" (stopped)" if t["stopped_early"] else ""),
            )
    ax.set(xlabel="step", ylabel=out["metric"], title="held-out metric per trial (dashed: stopped early)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=90)
    plt.close(fig)
    rows = trials_table(out).splitlines()
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in rows if not ln.startswith("|---")]
    table = "<table border=1 cellpadding=4>" + "".join(
        "<tr>" + "".join(f"<{'th' if i == 0 else 'td'}>{html.escape(c)}</{'th' if i == 0 else 'td'}>" for c in r) + "</tr>"
        for i, r in enumerate(cells)
    ) + "</table>"  # fmt: skip
    best = out["best"]
    note = (
        f"<p>best: {html.escape(best['trial'])} ({out['metric']} {best['best']:.4f}), its model in final/</p>"
        if best
        else ""
    )
    text = (f"<!doctype html><html lang=en><meta charset='utf-8'><title>cpo-ray sweep: {html.escape(cfg.name)}</title>"
            f"<h1>cpo-ray sweep: {html.escape(cfg.name)}</h1><p>{len(out['trials'])} trials, {out['seconds']:.0f} s</p>{note}"
            f"<img src='data:image/png;base64,{base64.b64encode(png.getvalue()).decode()}'>{table}</html>\n")  # fmt: skip
    paths = RunPaths.of(cfg)
    paths.report_html.write_text(text)
    local = Location(paths.local_dir) / paths.report_html.name
    if local != paths.report_html:
        local.write_text(text)
    return paths.report_html
