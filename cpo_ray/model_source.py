"""Which model a run uses, as a reference every stage and node can load: a hub id, a local folder, a storage
URI, the embedded tiny model (built offline) or a GGUF file (converted once to safetensors).

    ref = resolve_model_path(cfg)     # driver, once: builds / converts into model.cache_dir (or output_dir)
    folder = loadable(ref)            # on any node: a local folder (a node-local copy of a storage URI)
    tokenizer = load_tokenizer(folder)

With object storage as the cache (output_dir on s3://...), the embedded model and GGUF conversions are built
on the driver in a temporary folder and published to storage; workers, replicas and the evaluator copy them to
their own node (cpo_ray.storage.node_copy), never assuming they can see the driver's disk.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from cpo_ray.config import EMBEDDED_MODEL, Config
from cpo_ray.storage import Location, is_remote, node_copy

MODEL_MARKER = "config.json"  # a model folder is complete when its config.json exists (written last)


def resolve_model_path(cfg: Config) -> str:
    """The model reference to load: builds the embedded model, or converts a GGUF file, into the cache
    (model.cache_dir, else the run's output_dir) when asked for one; returns a local path, URI or hub id."""
    from cpo_ray import gguf
    from cpo_ray.embedded import STAMP, build_embedded_model

    model_cfg = cfg.model
    cache = Location(model_cfg.cache_dir or cfg.output_dir)
    if model_cfg.name_or_path == EMBEDDED_MODEL:
        dest = cache / "embedded-tiny"
        if dest.is_local:
            return str(build_embedded_model(dest.local, model_cfg.tiny))
        if not ((dest / MODEL_MARKER).is_file() and _published_as(dest / STAMP, model_cfg.tiny.model_dump_json())):
            with tempfile.TemporaryDirectory() as tmp:
                dest.publish_from(build_embedded_model(Path(tmp) / "m", model_cfg.tiny), marker=MODEL_MARKER)
        return dest.uri
    if gguf.is_gguf(model_cfg.name_or_path):
        if cache.is_local:
            return str(gguf.convert(model_cfg.name_or_path, cache.local).resolve())
        local = gguf.convert(model_cfg.name_or_path, Path(tempfile.gettempdir()) / "cpo-ray-gguf")
        dest = cache / "gguf" / local.name
        if not (dest / MODEL_MARKER).is_file():
            dest.publish_from(local, marker=MODEL_MARKER)
        return dest.uri
    if is_remote(model_cfg.name_or_path):
        return Location(model_cfg.name_or_path).uri
    local = Path(model_cfg.name_or_path).expanduser()
    # Workers and replicas run in other directories: a local folder travels as an absolute path.
    return str(local.resolve()) if local.exists() else model_cfg.name_or_path


def _published_as(stamp: Location, content: str) -> bool:
    """Whether a stamp file exists with this content (the same embedded shape is already in storage)."""
    import json

    return stamp.is_file() and json.loads(stamp.read_text()) == json.loads(content)


def loadable(model_ref: str) -> str:
    """What transformers can load on THIS node: a storage URI becomes a node-local copy; a folder or hub id
    stays as it is."""
    return str(node_copy(model_ref, MODEL_MARKER)) if is_remote(model_ref) else model_ref


def model_config(model_ref: str, trust_remote_code: bool = False):
    """The transformers config of a model reference, reading only its config.json when it is in storage."""
    from transformers import AutoConfig

    if not is_remote(model_ref):
        return AutoConfig.from_pretrained(model_ref, trust_remote_code=trust_remote_code)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / MODEL_MARKER).write_bytes((Location(model_ref) / MODEL_MARKER).read_bytes())
        return AutoConfig.from_pretrained(tmp, trust_remote_code=trust_remote_code)


def load_tokenizer(model_ref: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(loadable(model_ref), trust_remote_code=trust_remote_code)
