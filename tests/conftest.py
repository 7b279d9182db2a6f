"""Shared fixtures. Tests never download: the model is the embedded tiny Llama built from a config."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(__file__).parent / "assets"
HH_FILE = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-base" / "test.jsonl.gz"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """The embedded default model (random tiny Llama + byte tokenizer), built once per session."""
    from cpo_ray.embedded import build_embedded_model

    return str(build_embedded_model(tmp_path_factory.mktemp("embedded") / "tiny"))


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def ray_local():
    """A private local Ray instance for this module (own temp dir), shut down by its own handle."""
    import ray

    tmp = tempfile.mkdtemp(prefix="cpo-ray-t-", dir="/tmp")  # short: Ray's socket paths have a length limit
    ctx = ray.init(num_cpus=4, include_dashboard=False, _temp_dir=tmp, logging_level="WARNING", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ctx
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)
