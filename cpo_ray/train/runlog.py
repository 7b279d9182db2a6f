"""The run's log of steps and events: rank 0 sends its rows through Ray, the driver's console reads them back,
and both files persist to the run's storage (local disk or an object store).

    log = runlog.start(cfg)                         # driver: a 0-CPU actor owned by this driver
    log.append.remote("metrics", row)               # rank 0, once per step
    cursor, rows = ray.get(log.since.remote(cursor))  # the driver's follower (cpo_ray.train.progress)

Rank 0 may run on any node and the driver on another: neither ever reads a file the other wrote on its own
disk. metrics.jsonl and events.jsonl are rewritten whole (an object store has no append) at most every
`PERSIST_S` seconds while rows arrive, and at once on `flush` (checkpoints, resume, the end), so what a
checkpoint covers is always on storage before the checkpoint is committed.
"""

from __future__ import annotations

import json
import threading
import time

from cpo_ray.contract import RunPaths
from cpo_ray.storage import Location

PERSIST_S = 2.0


class RunLogActor:
    """Holds metrics.jsonl / events.jsonl rows in memory, persists them, queues every new row for the console (a
    truncation on resume drops rows from the files, never from what the console already saw), and feeds the
    experiment trackers (cpo_ray.tracking; opened at the first row, once a new run or a resume is known)."""

    def __init__(self, cfg: dict):
        from cpo_ray.config import Config

        self.cfg = Config.model_validate(cfg)
        paths = RunPaths.of(self.cfg)
        self.files = {"metrics": paths.metrics, "events": paths.events}
        self.rows = {kind: _read_jsonl(loc) for kind, loc in self.files.items()}
        self.outbox: list[tuple[str, dict]] = []
        self.dirty: set[str] = set()
        self.lock = threading.Lock()  # flushes may also come from the driver's own process (tests, close)
        self.last_persist = 0.0
        self.trackers = None

    def reset(self) -> None:
        """A new run (no checkpoint): its own files and tracked runs, not an earlier run's."""
        with self.lock:
            self.rows = {kind: [] for kind in self.files}
            self.dirty = set(self.files)
        (RunPaths.of(self.cfg).output_dir / "tracking.json").unlink()
        self.flush()

    def append(self, kind: str, row: dict) -> None:
        with self.lock:
            self.rows[kind].append(row)
            self.outbox.append((kind, row))
            self.dirty.add(kind)
        self._track(kind, row)
        if time.monotonic() - self.last_persist >= PERSIST_S:
            self.flush()

    def _track(self, kind: str, row: dict) -> None:
        from cpo_ray.tracking import Trackers

        if not self.cfg.train.report_to:
            return
        if self.trackers is None:
            self.trackers = Trackers.open(self.cfg)
        if kind == "metrics":
            self.trackers.metrics(row, row.get("step", 0))
        else:
            self.trackers.event(json.dumps({k: v for k, v in row.items() if k != "replayed"}))

    def close(self) -> None:
        """The run ended: everything persisted, the trackers' runs closed."""
        self.flush()
        if self.trackers is not None:
            self.trackers.close()
            self.trackers = None

    def truncate(self, step: int) -> list[dict]:
        """On resume, drop metric rows past the checkpoint (those steps train again); returns the dropped
        training rows. An earlier run's final evaluation at or before the checkpoint stays, as an
        evaluation row (its training metrics repeat its step's)."""
        with self.lock:
            rows = self.rows["metrics"]
            keep = [r for r in rows if r.get("step", 0) <= step and not r.get("final")]
            keep += [eval_only(r) for r in rows if r.get("final") and r.get("step", 0) <= step]
            self.rows["metrics"] = sorted(keep, key=lambda r: (r.get("step", 0), "loss" not in r))
            self.dirty.add("metrics")
        return [r for r in rows if r.get("step", 0) > step and "loss" in r and not r.get("final")]

    def since(self, cursor: int) -> tuple[int, list[tuple[str, dict]]]:
        """The rows appended after `cursor` (a count), and the new cursor."""
        with self.lock:
            return len(self.outbox), self.outbox[cursor:]

    def read(self, kind: str) -> list[dict]:
        with self.lock:
            return list(self.rows[kind])

    def flush(self) -> None:
        with self.lock:
            dirty, self.dirty = self.dirty, set()
            texts = {kind: "".join(json.dumps(r) + "\n" for r in self.rows[kind]) for kind in dirty}
            self.last_persist = time.monotonic()
        for kind, text in texts.items():
            self.files[kind].write_text(text)
        if self.trackers is not None:
            self.trackers.flush()


def eval_only(row: dict) -> dict:
    """A row's step and held-out scores alone (a final row repeats its step's training metrics)."""
    return {k: v for k, v in row.items() if k == "step" or k.startswith("eval/")}


def _read_jsonl(loc: Location) -> list[dict]:
    if not loc.is_file():
        return []
    return [json.loads(ln) for ln in loc.read_text().splitlines() if ln.strip()]


def start(cfg):
    """The run log actor for this run (cfg: the anchored Config): 0 CPUs, on the driver's node, owned by (and
    ending with) this driver. One thread: rank 0's calls run in the order it made them (a reset before the
    first row, steps in order for the trackers); the console's polls wait behind a flush at worst."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    actor = ray.remote(num_cpus=0, max_concurrency=1)(RunLogActor)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return actor.options(scheduling_strategy=here).remote(cfg.model_dump(mode="json"))
