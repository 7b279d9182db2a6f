"""A worker's run state across restarts: what a checkpoint holds besides DeepSpeed's shards, and resuming.

`resume` restores a worker from Ray Train's latest checkpoint (weights, optimizer, scheduler, the step and data
position, and this rank's random-number generators) and records the restart in events.jsonl through the run
log (cpo_ray.train.runlog); `save_state` writes what `resume` reads. Steps past the checkpoint are dropped from
metrics.jsonl: they train again, on the same pairs with the same dropout masks (their digests and losses must
repeat).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from cpo_ray.config import ConfigError
from cpo_ray.contract import CHECKPOINT_STATE

# What fixes which pairs each micro-batch holds: a resume under another layout would skip or repeat pairs.
LAYOUT_KEYS = ("micro_batch_size", "grad_accum", "group_by_length", "num_workers", "shuffle", "seed")


def layout(tc) -> dict:
    return {k: getattr(tc, k) for k in LAYOUT_KEYS if hasattr(tc, k)}


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def save_state(folder: Path, state: dict, rank: int) -> None:
    """Into a checkpoint folder: this rank's RNG states (dropout masks, anything random in the step), and on
    rank 0 the step, data position and settings (cpo_state.json)."""
    import numpy as np
    import torch

    rngs = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rngs["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rngs, folder / rng_file(rank))
    if rank == 0:
        (folder / CHECKPOINT_STATE).write_text(json.dumps(state))


def _restore_rngs(folder: Path, rank: int) -> None:
    import numpy as np
    import torch

    path = folder / rng_file(rank)
    if not path.exists():  # a checkpoint written before RNG states were saved: resume, but not bit-exact
        return
    rngs = torch.load(path, weights_only=False)
    torch.set_rng_state(rngs["torch"])
    np.random.set_state(rngs["numpy"])
    random.setstate(rngs["python"])
    if "cuda" in rngs and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rngs["cuda"])


def resume(engine, log, rank: int, tc, total: int, lora: bool = False) -> dict:
    """DeepSpeed state (weights, optimizer, scheduler) + our step and data position from Ray Train's latest
    checkpoint. The config's lr, betas, weight decay, clipping and step budget win over the checkpoint's; what
    changed is recorded in events.jsonl, with the steps whose metrics are discarded (they train again, on the
    same pairs: their data digests must repeat). A new run starts its own metrics and events files. `lora`: the
    checkpoint holds trained weights only (save_checkpoint excluded the frozen base)."""
    import tempfile

    import ray.train

    from cpo_ray.train.engine import apply_hparams

    hparams = {"total_steps": total, "max_grad_norm": tc.max_grad_norm}
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "hparams": hparams, "layout": layout(tc)}
    ckpt = ray.train.get_checkpoint()
    changed = {}
    if ckpt:
        # A private copy per rank: ranks sharing a node would share (and one delete) as_directory()'s folder.
        with tempfile.TemporaryDirectory(prefix=f"cpo-resume-r{rank}-") as tmp:
            folder = Path(ckpt.to_directory(tmp))
            # a LoRA checkpoint holds the trained weights only: the frozen base came from the model already
            engine.load_checkpoint(str(folder), tag="ckpt", load_module_strict=not lora)
            state = json.loads((folder / CHECKPOINT_STATE).read_text())
            _restore_rngs(folder, rank)
        changed = apply_hparams(engine, tc)
        saved = state.get("hparams", {})
        changed |= {k: (saved.get(k), v) for k, v in hparams.items() if saved.get(k) != v}
        state["hparams"] = hparams
    if rank == 0:
        if not ckpt:
            log.reset.remote()
        else:  # restarts (worker or driver crash, or a longer re-run) are recorded, not just printed
            import ray

            replayed = ray.get(log.truncate.remote(state["step"]))
            keep = ("step", "loss", "data/digest")
            event = {"event": "resume", "time": time.time(), **state, "changed": changed}
            log.append.remote("events", event | {"replayed": [{k: r.get(k) for k in keep} for r in replayed]})
            ray.get(log.flush.remote())
    return state


def check_layout(storage, name: str, tc) -> None:
    """Driver, before any worker starts: refuse to resume a run whose checkpoint was trained with another batch
    layout (the data position counts micro-batches of the old size: pairs would be skipped or trained twice)."""
    run = storage / name
    for ckpt in reversed(run.glob("checkpoint_*")):  # newest first; a torn one is skipped
        try:
            saved = json.loads((ckpt / CHECKPOINT_STATE).read_text()).get("layout")
        except (OSError, ValueError):
            continue
        now = layout(tc)
        diff = {k: (saved.get(k), now[k]) for k in now if saved is not None and k in saved and saved[k] != now[k]}
        if diff:
            what = ", ".join(f"train.{k} {a} -> {b}" for k, (a, b) in diff.items())
            raise ConfigError(
                f"run {name!r} resumes from {ckpt.uri}, trained with another batch layout ({what}): the saved data "
                "position would skip or repeat pairs. Use the old settings to resume, or start fresh with a new "
                f"`name=` (or delete {run.uri})"
            )
        return
