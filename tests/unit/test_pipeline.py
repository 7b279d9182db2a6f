"""run_pipeline's stage logic without engines: what is skipped, and what is found before any engine starts.
The heavy stages are replaced by functions that leave the artifacts a real stage leaves (their own tests are
integration tests); serving raises, so a test passes only if the pipeline decided before starting it."""

from __future__ import annotations

import pytest

from cpo_ray import pipeline
from cpo_ray.config import load_config
from cpo_ray.contract import EVAL, FINAL_MARKER, TRAIN, RunPaths, Stage


@pytest.fixture
def stages(monkeypatch):
    calls = []

    def prepare(cfg):
        calls.append(Stage.PREPARE)
        paths = RunPaths.of(cfg)
        paths.prepare_report.write_text("{}")
        (paths.split_dir(TRAIN) / "part-0.parquet").write_bytes(b"PAR1")
        paths.split_dir(EVAL).mkdir()  # the eval split exists but every row of it was rejected (or none carved)

    def train(cfg):
        calls.append(Stage.TRAIN)
        paths = RunPaths.of(cfg)
        (paths.final / FINAL_MARKER).write_text("{}")
        paths.train_summary.write_text("{}")

    def serve(cfg, timings):
        raise AssertionError("engines started although there is nothing to score")

    monkeypatch.setattr(pipeline, "stage_prepare", prepare)
    monkeypatch.setattr(pipeline, "stage_train", train)
    monkeypatch.setattr(pipeline, "serve_and_eval", serve)
    return calls


def test_no_heldout_pairs_skips_scoring_before_any_engine_starts(stages, tmp_path, capsys):
    cfg = load_config(None, [f"output_dir={tmp_path}"])
    pipeline.run_pipeline(cfg, skip={Stage.REPORT})
    assert stages == [Stage.PREPARE, Stage.TRAIN]
    out = capsys.readouterr().out
    assert "eval: skipped (no held-out pairs in" in out and "data.eval_split" in out


def test_a_run_killed_after_an_early_export_trains_again(stages, tmp_path):
    """train.select_by publishes final/ at the first evaluation: without train_summary.json (written when training
    ends) the run is not done, and a re-run resumes training instead of skipping it."""
    cfg = load_config(None, [f"output_dir={tmp_path}"])
    paths = RunPaths.of(cfg)
    (paths.final / FINAL_MARKER).write_text("{}")  # an early export, then the kill
    pipeline.run_pipeline(cfg, skip={Stage.REPORT, Stage.EVAL})
    assert stages == [Stage.PREPARE, Stage.TRAIN]
    pipeline.run_pipeline(cfg, skip={Stage.REPORT, Stage.EVAL})
    assert stages == [Stage.PREPARE, Stage.TRAIN]  # done now: nothing runs again
