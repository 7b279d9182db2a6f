"""Every private dependency API that cpo_ray.compat touches still exists: an upgrade that moves one fails here,
by name, instead of deep inside a training run or a server start."""

import inspect

import pytest


def test_deepspeed_private_hooks():
    import deepspeed
    from deepspeed.runtime.engine import DeepSpeedEngine

    assert "deepspeed_shm_comm" in deepspeed.ops.__compatible_ops__
    assert callable(DeepSpeedEngine._zero3_consolidated_16bit_state_dict)
    assert "self.enable_backward_allreduce" in inspect.getsource(DeepSpeedEngine)


def test_transformers_attn_implementation(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from cpo_ray.compat import attn_implementation

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    assert attn_implementation(model) == "eager"


def test_ray_train_report_logger():
    from ray.train.v2._internal.execution import context

    assert "Reporting training result" in inspect.getsource(context)  # the line our logger change quiets


def test_ray_serve_llm_ingress_wiring():
    pytest.importorskip("ray.serve.llm")
    from fastapi import FastAPI
    from ray.serve.llm import LLMConfig

    from cpo_ray.compat import model_card, openai_ingress_app

    assert isinstance(openai_ingress_app(), FastAPI)
    cfg = LLMConfig(
        model_loading_config={"model_id": "m", "model_source": "/nowhere"}, accelerator_config={"kind": "cpu"}
    )
    assert model_card("m", cfg).id == "m"


def test_ray_tune_result_grid_trials():
    from ray.tune import ResultGrid
    from ray.tune.experiment import Trial

    assert "self._experiment_analysis = experiment_analysis" in inspect.getsource(ResultGrid.__init__)
    assert "for trial in self._experiment_analysis.trials" in inspect.getsource(ResultGrid.__init__)
    assert Trial.TERMINATED == "TERMINATED" and Trial.ERROR == "ERROR"
