"""A worker's run state across restarts: the checkpoint it resumes from and the files rank 0 keeps.

`resume` restores a worker from Ray Train's latest checkpoint and records the restart in events.jsonl;
`append_row` / `truncate_metrics` keep metrics.jsonl one line per trained step (steps past the checkpoint are
dropped: they train again). The driver's console follows those files (cpo_ray.train.progress).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from cpo_ray.contract import CHECKPOINT_STATE, RunPaths


def resume(engine, paths: RunPaths, rank: int, tc, total: int) -> dict:
    """DeepSpeed state (weights, optimizer, scheduler) + our step and data position from Ray Train's latest
    checkpoint. The config's lr, betas, weight decay, clipping and step budget win over the checkpoint's; what
    changed is recorded in events.jsonl, with the steps whose metrics are discarded (they train again, on the
    same pairs: their data digests must repeat). A new run starts its own metrics and events files."""
    import ray.train

    from cpo_ray.train.engine import apply_hparams

    hparams = {"total_steps": total, "max_grad_norm": tc.max_grad_norm}
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "hparams": hparams}
    ckpt = ray.train.get_checkpoint()
    changed = {}
    if ckpt:
        with ckpt.as_directory() as d:
            engine.load_checkpoint(d, tag="ckpt")
            state = json.loads((Path(d) / CHECKPOINT_STATE).read_text())
        changed = apply_hparams(engine, tc)
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


def truncate_metrics(path: Path, step: int) -> list[dict]:
    """On resume, drop metric lines past the checkpoint (those steps train again); returns the dropped ones."""
    if not path.exists():
        return []
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln]
    keep = [r for r in rows if r.get("step", 0) <= step and not r.get("final")]
    path.write_text("".join(json.dumps(r) + "\n" for r in keep))
    return [r for r in rows if r.get("step", 0) > step and "loss" in r and not r.get("final")]
