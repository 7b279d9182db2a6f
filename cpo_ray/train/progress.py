"""The driver's view of a training run on the console: a thread that follows what rank 0 writes.

    with following(paths, total_steps, every):    # around trainer.fit()
        ...

Held-out scores, a progress line every `every` steps (live on a terminal), resumes and the settings they changed.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path

from cpo_ray.contract import RunPaths


class _Tail:
    """New complete lines of a file that rank 0 appends to, rewrites (resume) or replaces (a new run)."""

    def __init__(self, path: Path):
        self.path = path
        st = path.stat() if path.exists() else None
        self.ino, self.pos = (st.st_ino, st.st_size) if st else (None, 0)  # history is not news

    def new_lines(self) -> list[str]:
        if not self.path.exists():
            return []
        st = self.path.stat()
        if st.st_ino != self.ino:  # a new file: all of it is new
            self.ino, self.pos = st.st_ino, 0
        elif st.st_size < self.pos:  # rewritten shorter (resume drops steps past the checkpoint)
            self.pos = st.st_size
        with self.path.open("rb") as f:
            f.seek(self.pos)
            data = f.read()
        done = data[: data.rfind(b"\n") + 1]  # a line being written waits for the next poll
        self.pos += len(done)
        return done.decode().splitlines()


def _follow(paths: RunPaths, total: int, every: int, stop) -> None:
    """Driver thread: the run's progress on the console, read from what rank 0 writes (metrics.jsonl,
    events.jsonl on the run's storage, which every node sees): held-out scores, a progress line every
    `every` steps (live on a terminal), resumes and the settings they changed."""
    from cpo_ray import console

    tails = [_Tail(paths.events), _Tail(paths.metrics)]
    first = None  # (step, time) of the first training step seen: the eta's rate
    while True:
        done = stop.wait(1.0)
        for tail in tails:
            for ln in tail.new_lines():
                row = json.loads(ln)
                if row.get("event") == "resume":
                    changed = (
                        "; changed " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in row["changed"].items())
                        if row["changed"]
                        else ""
                    )
                    console.say(f"resumed at step {row['step']} (epoch {row['epoch']}){changed}")
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
                    if ev:
                        console.say(line)
                    else:
                        console.live(line)
        if done:
            return


@contextlib.contextmanager
def following(paths: RunPaths, total: int, every: int):
    """`_follow` in a daemon thread for the duration of the block (the driver's trainer.fit())."""
    stop = threading.Event()
    thread = threading.Thread(target=_follow, args=(paths, total, every, stop), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)
