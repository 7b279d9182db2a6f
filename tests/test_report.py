"""The run report reads every artifact where the config put it (custom data/eval folders included)."""

import json

from cpo_ray.config import load_config
from cpo_ray.contract import RunPaths
from cpo_ray.report import write_report


def test_report_follows_custom_output_dirs(tmp_path):
    cfg = load_config(
        None,
        [f"output_dir={tmp_path / 'run'}", f"data.output_dir={tmp_path / 'elsewhere' / 'data'}", f"eval.output_dir={tmp_path / 'evals'}"],
    )  # fmt: skip
    paths = RunPaths.of(cfg)
    for d in (paths.output_dir, paths.data_dir, paths.eval_dir):
        d.mkdir(parents=True)
    split = {"rows_read": 10, "rows_kept": 9, "rejected_by_reason": {"not_string": 1}, "truncated": 2, "tokens": {}}
    paths.prepare_report.write_text(
        json.dumps({"rows_read": 10, "rows_kept": 9, "rows_rejected": 1, "splits": {"train": split}})
    )
    paths.eval_md.write_text("| metric | base | tuned |\n|---|---|---|\n| accuracy | 50.0% | 97.5% |\n")
    paths.metrics.write_text(json.dumps({"step": 1, "loss": 1.0, "eval/accuracy": 0.5, "eval/margin": 0.1}) + "\n")
    html = write_report(cfg).read_text()
    assert "97.5%" in html and "not_string" in html and "10 rows read" in html
