"""A run's state across restarts, in the files rank 0 writes next to the checkpoints.

`resume` restores a worker from Ray Train's latest checkpoint and records the restart in events.jsonl;
`append_row` / `truncate_metrics` keep metrics.jsonl one line per trained step (steps past the checkpoint are
dropped: they train again); `following` runs `follow`, the driver's thread that turns those two files into console lines.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path

from cpo_ray.contract import CHECKPOINT_STATE, RunPaths


def resume(engine, paths: RunPaths, rank: int, t, total: int) -> dict:
    """DeepSpeed state (weights, optimizer, scheduler) + our step and data position from Ray Train's latest
    checkpoint. The config's lr, betas, weight decay, clipping and step budget win over the checkpoint's; what
    changed is recorded in events.jsonl, with the steps whose metrics are discarded (they train again, on the
    same pairs: their data digests must repeat). A new run starts its own metrics and events files."""
    import ray.train

    from cpo_ray.model import apply_hparams

    hparams = {"total_steps": total, "max_grad_norm": t.max_grad_norm}
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "hparams": hparams}
    ckpt = ray.train.get_checkpoint()
    changed = {}
    if ckpt:
        with ckpt.as_directory() as d:
            engine.load_checkpoint(d, tag="ckpt")
            state = json.loads((Path(d) / CHECKPOINT_STATE).read_text())
        changed = apply_hparams(engine, t)
        saved = state.get("hparams", {})
        changed |= {k: (saved.get(k), v) for k, v in hparams.items() if saved.get(k) != v}
        state["hparams"] = hparams
    if rank == 0:
        paths.output_dir.mkdir(parents=True, exist_ok=True)
        if not ckpt:
            paths.metrics.unlink(missing_ok=True)
            paths.events.unlink(missing_ok=True)
        else:  # restarts (worker or driver crash, or a longer re-run) are recorded, not just printed
            replayed = truncate_metrics(paths.metrics, state["step"])
            keep = ("step", "loss", "data/digest")
            event = {"event": "resume", "time": time.time(), **state, "changed": changed}
            append_row(paths.events, event | {"replayed": [{k: r.get(k) for k in keep} for r in replayed]})
    return state


def append_row(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


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


def follow(paths: RunPaths, total: int, every: int, stop) -> None:
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


def truncate_metrics(path: Path, step: int) -> list[dict]:
    """On resume, drop metric lines past the checkpoint (those steps train again); returns the dropped ones."""
    if not path.exists():
        return []
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln]
    keep = [r for r in rows if r.get("step", 0) <= step and not r.get("final")]
    path.write_text("".join(json.dumps(r) + "\n" for r in keep))
    return [r for r in rows if r.get("step", 0) > step and "loss" in r and not r.get("final")]


@contextlib.contextmanager
def following(paths: RunPaths, total: int, every: int):
    """`follow` in a daemon thread for the duration of the block (the driver's trainer.fit())."""
    stop = threading.Event()
    thread = threading.Thread(target=follow, args=(paths, total, every, stop), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)
