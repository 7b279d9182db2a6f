"""Every use of a dependency's private API, each behind one small function.

Each exists because no public API does the job; each names the version it was written against, and
tests/test_compat.py fails loudly when an upgrade moves or removes what it touches. Written for ray 2.60.0,
deepspeed 0.19.8, transformers 5.19.0.
"""

from __future__ import annotations


def skip_deepspeed_shm_comm_build() -> None:
    """deepspeed 0.19.8: every first deepspeed.initialize builds the shared-memory comm C++ op (tens of
    seconds on a small CPU host) although it is only used with LOCAL_SIZE set; marking it incompatible skips
    the build."""
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def zero3_full_state_dict(engine) -> dict | None:
    """deepspeed 0.19.8: the consolidated (gathered) ZeRO-3 state dict, as save_16bit_model uses internally;
    a collective, returns None off rank 0. The public save_16bit_model only writes a file."""
    return engine._zero3_consolidated_16bit_state_dict()


def disable_deepspeed_backward_allreduce(engine) -> None:
    """deepspeed 0.19.8: ZeRO-0 all-reduces gradients after backward unless this engine attribute is False
    (there is no config key for it); cpo_ray.train.gradsync then does the all-reduce, overlapped with backward."""
    if not hasattr(engine, "enable_backward_allreduce"):
        raise AttributeError("DeepSpeedEngine.enable_backward_allreduce is gone: set train.overlap_grad_sync=false")
    engine.enable_backward_allreduce = False


def attn_implementation(model) -> str | None:
    """transformers 5.19: the attention a model runs is only readable from config._attn_implementation."""
    return model.config._attn_implementation


def quiet_ray_train_report_logs() -> None:
    """ray 2.60 (Train V2): every ray.train.report() is logged at INFO with all its metrics by a logger named
    after its file; at one report per few steps that buries the progress line, so raise it to WARNING."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: keep its logs
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def openai_ingress_app():
    """ray 2.60: the FastAPI app that ray.serve.llm.build_openai_app builds its ingress on. Needed to add
    our Bearer-auth middleware: build_openai_app takes no app or middleware, and Serve 2.60 removed
    HTTPOptions.middlewares in favour of passing a FastAPI app to make_fastapi_ingress."""
    from ray.llm._internal.serve.core.ingress.ingress import init

    return init()


def model_card(model_id: str, llm_config):
    """ray 2.60: the /v1/models entry of one LLMConfig, as build_openai_app builds it for the ingress."""
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata

    return to_model_metadata(model_id, llm_config)


def tune_trial_statuses(grid) -> list[str]:
    """ray 2.60: each trial's status ("TERMINATED", "ERROR", "PENDING", "RUNNING", "PAUSED") in the order of
    the ResultGrid's results. Public Result objects do not say whether a trial finished: an interrupted sweep's
    unfinished trials would otherwise look like trials the scheduler stopped."""
    return [trial.status for trial in grid._experiment_analysis.trials]
