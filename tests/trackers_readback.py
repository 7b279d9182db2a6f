"""Reading what the trackers stored, with each tool's own reader, for the tracking tests."""

from __future__ import annotations

import glob
import json
import struct
from pathlib import Path


def mlflow_history(tracking_uri: str, run_id: str, key: str) -> dict[int, float]:
    from mlflow.tracking import MlflowClient

    return {m.step: m.value for m in MlflowClient(tracking_uri=tracking_uri).get_metric_history(run_id, key)}


def tensorboard_scalars(logdir: Path, key: str) -> dict[int, float]:
    """Every event file of the folder (one per writer: a resumed run adds one), through tensorboard's reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[int, float] = {}
    for f in sorted(Path(logdir).glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f))
        acc.Reload()
        if key in acc.Tags()["scalars"]:
            out |= {e.step: e.value for e in acc.Scalars(key)}
    return out


def wandb_history(wandb_dir: Path, run_id: str, key: str) -> dict[int, float]:
    """The history rows of an offline W&B run (every offline-run-*-<id> folder: a resume adds one). The
    .wandb file is a LevelDB-style log of W&B protobuf records (7-byte header, 32 KiB blocks, each record
    crc32c + length + type, FULL/FIRST/MIDDLE/LAST) since wandb-core replaced the Python datastore."""
    from wandb.proto import wandb_internal_pb2 as pb

    out: dict[int, float] = {}
    for f in sorted(glob.glob(str(Path(wandb_dir) / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb"))):
        for data in _log_records(Path(f).read_bytes()):
            rec = pb.Record()
            rec.ParseFromString(data)
            if rec.WhichOneof("record_type") == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                if key in row:
                    out[int(row["_step"])] = float(row[key])
    return out


def _log_records(data: bytes, block: int = 32768):
    pos, parts = 7, []
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # a block's tail too short for a header is padding
            pos += room
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        if length == 0 and kind == 0:
            pos += room
            continue
        piece = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            yield piece
        elif kind == 2:
            parts = [piece]
        elif kind == 3:
            parts.append(piece)
        elif kind == 4:
            parts.append(piece)
            yield b"".join(parts)
