"""Access defaults: loopback binding, no remote code, safetensors only (weights never unpickled)."""

import shutil
from pathlib import Path

import pytest
import torch

from cpo_ray.config import load_config


def test_defaults_are_closed():
    cfg = load_config(None)
    assert cfg.serve.host == "127.0.0.1"
    assert cfg.serve.api_key is None  # opt-in, or env CPO_RAY_API_KEY (see serve tests for 401s)
    assert cfg.model.trust_remote_code is False
    for path in Path("configs").glob("*.yaml"):
        c = load_config(path)
        assert c.model.trust_remote_code is False, path
        assert c.serve.host == "127.0.0.1", path


def test_pickle_weights_are_refused(tiny_model_dir, tmp_path):
    """A folder with only pytorch_model.bin (a pickle) must not load: training loads safetensors only."""
    from safetensors.torch import load_file

    from cpo_ray.train.model import build_model

    bad = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, bad)
    state = load_file(bad / "model.safetensors")
    (bad / "model.safetensors").unlink()
    torch.save(state, bad / "pytorch_model.bin")
    cfg = load_config(None)
    with pytest.raises(OSError, match="safetensors|model.safetensors"):
        build_model(cfg, str(bad), torch.float32)
    assert build_model(cfg, tiny_model_dir, torch.float32) is not None
