"""Which model a run uses, as a folder every stage can load: a hub id, a local folder, the embedded tiny
model (built offline) or a GGUF file (converted once to safetensors).

    model_path = resolve_model_path(cfg)      # prepare tokenizes with it, train loads it, serve serves it
    tokenizer = load_tokenizer(model_path)
"""

from __future__ import annotations

from pathlib import Path

from cpo_ray.config import EMBEDDED_MODEL, Config
from cpo_ray.contract import RunPaths


def resolve_model_path(cfg: Config) -> str:
    """The folder or hub id to load: builds the embedded model, or converts a GGUF file, under the cache
    folder (model.cache_dir, else the run's output_dir) when asked for one."""
    from cpo_ray import gguf
    from cpo_ray.embedded import build_embedded_model

    model_cfg = cfg.model
    cache = Path(model_cfg.cache_dir) if model_cfg.cache_dir else RunPaths.of(cfg).model_cache
    if model_cfg.name_or_path == EMBEDDED_MODEL:
        return str(build_embedded_model(cache / "embedded-tiny", model_cfg.tiny).resolve())
    if gguf.is_gguf(model_cfg.name_or_path):
        return str(gguf.convert(model_cfg.name_or_path, cache).resolve())
    local = Path(model_cfg.name_or_path).expanduser()
    # Workers and replicas run in other directories: a local folder travels as an absolute path.
    return str(local.resolve()) if local.exists() else model_cfg.name_or_path


def load_tokenizer(model_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
