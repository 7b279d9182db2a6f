"""The driver's view of a training run on the console: a thread that follows the run log.

    with following(log, total_steps, every):    # around trainer.fit(); log = cpo_ray.train.runlog.start(cfg)
        ...

Held-out scores, a progress line every `every` steps (live on a terminal), resumes and the settings they changed.
The rows come through Ray from rank 0 (cpo_ray.train.runlog), whatever node it runs on.
"""

from __future__ import annotations

import contextlib
import threading
import time


def _resume_line(row: dict) -> str:
    changed = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in row["changed"].items())
    return f"resumed at step {row['step']} (epoch {row['epoch']})" + (f"; changed {changed}" if changed else "")


def _follow(log, total: int, every: int, stop) -> None:
    """Driver thread: poll the run log once a second and turn its new rows into console lines."""
    import ray

    from cpo_ray import console

    cursor = 0
    first = None  # (step, time) of the first training step seen: the eta's rate
    while True:
        done = stop.wait(1.0)
        try:
            cursor, rows = ray.get(log.since.remote(cursor), timeout=30)
        except TimeoutError:  # the actor is busy (a slow upload to storage): ask again, the rows wait there
            rows = []
        except ray.exceptions.RayError:  # the log is gone (shutdown): nothing more to show
            return
        for kind, row in rows:
            if kind == "events":
                if row.get("event") == "resume":
                    console.say(_resume_line(row))
                continue
            step = row.get("step", 0)
            if first is None and "loss" in row:
                first = (step, time.time())
            if "eval/accuracy" in row and (step == 0 or row.get("final") or "loss" not in row):
                acc, margin = row["eval/accuracy"], row["eval/margin"]
                console.say(f"step {step:>5}/{total} | held-out accuracy {acc:.3f}, margin {margin:.2f}")
            elif "loss" in row and (step % every == 0 or "eval/accuracy" in row):
                rate = (time.time() - first[1]) / (step - first[0]) if step > first[0] else None
                eta = f"{rate * (total - step):,.0f}s" if rate is not None else "-"
                ev = f" | held-out {row['eval/accuracy']:.3f}" if "eval/accuracy" in row else ""
                acc = f"acc {row['rewards/accuracies']:.2f}" if "rewards/accuracies" in row else "sft (chosen NLL)"
                line = (f"step {step:>5}/{total} | loss {row['loss']:.4f} | {acc} "
                        f"| {row['tokens_per_s']:,.0f} tok/s | eta {eta}{ev}")  # fmt: skip
                (console.say if ev else console.live)(line)
        if done:
            return


@contextlib.contextmanager
def following(log, total: int, every: int):
    """`_follow` in a daemon thread for the duration of the block (the driver's trainer.fit()); the last rows
    are shown before the block's end returns."""
    stop = threading.Event()
    thread = threading.Thread(target=_follow, args=(log, total, every, stop), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(35)
