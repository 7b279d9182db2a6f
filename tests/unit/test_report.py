"""The run report: every artifact read where the config put it, rendered as tables and inlined images."""

import base64
import json
import re
from html.parser import HTMLParser

from cpo_ray.config import load_config
from cpo_ray.contract import RunPaths
from cpo_ray.eval.render import write_report as write_eval_report
from cpo_ray.eval.scorer import pair_row, summarize
from cpo_ray.eval.stats import compare
from cpo_ray.report import write_report


class _Doc(HTMLParser):
    """Headings, tables (as lists of rows of cell text) and image sources of an HTML page."""

    def __init__(self):
        super().__init__()
        self.h2, self.tables, self.images, self.details = [], [], [], 0
        self._text, self._cell, self._in = [], None, None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(dict(attrs)["src"])
        elif tag == "h2":
            self._in = []
        elif tag == "details":
            self.details += 1

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "h2":
            self.h2.append("".join(self._in).strip())
            self._in = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._in is not None:
            self._in.append(data)


def _fake_run(tmp_path):
    """A finished tiny run: metrics with an eval curve and a resume, eval.json with base/tuned, a prepare
    report with rejects, timings; data and eval written to custom folders."""
    cfg = load_config(
        "configs/tiny-cpu.yaml",
        [f"output_dir={tmp_path / 'run'}", f"data.output_dir={tmp_path / 'elsewhere' / 'data'}", f"eval.output_dir={tmp_path / 'evals'}"],
    )  # fmt: skip
    paths = RunPaths.of(cfg)
    split = {
        "rows_read": 10, "rows_kept": 9, "rows_rejected": 1, "rejected_by_reason": {"not_string": 1},
        "examples": {"not_string": ["shard.jsonl:4: chosen: 'chosen' must be a string, got int"]},
        "truncated": 2, "boundary_merges": 0,
        "tokens": {p: {"mean": 12.5, "p50": 12, "p95": 20, "max": 31} for p in ("prompt", "chosen", "rejected")},
    }  # fmt: skip
    paths.prepare_report.write_text(json.dumps({"model": "m", "max_length": 128, "splits": {"train": split}}))
    rows = [{"step": 0, "eval/accuracy": 0.5, "eval/margin": 0.1}]
    rows += [{"step": s, "loss": 2.0 / s, "nll_loss": 1.0, "rewards/accuracies": 0.9, "rewards/margins": 0.2,
              "tokens_per_s": 800.0, "tokens": 500, "elapsed_s": 2.0 * s} for s in range(1, 31)]  # fmt: skip
    rows += [{"step": 30, "eval/accuracy": 0.95, "eval/margin": 9.0, "final": True}]
    paths.metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths.events.write_text(
        json.dumps({"event": "resume", "step": 10, "epoch": 0, "changed": {"lr": [1e-3, 2e-3]}, "replayed": []}) + "\n"
    )
    pair = {"prompt_ids": [1], "chosen_ids": [3, 2], "rejected_ids": [4, 2]}
    by_model = {
        "base": [pair_row(i, pair, -2.0 - i % 3, -2.5) for i in range(10)],
        "tuned": [pair_row(i, pair, -1.0, -3.0 - i) for i in range(10)],
    }
    result = {
        "endpoint": "http://127.0.0.1:1/v1", "n_pairs": 10, "baseline": "base", "pairs_per_request": 8, "scoring_s": 1.0,
        "models": {m: summarize(r) | {"pairs_per_s": 12.5} for m, r in by_model.items()},
        "comparisons": {"tuned": compare(by_model["base"], by_model["tuned"])},
        "samples": [{"prompt": "<s>47 in words:", "chosen": "forty-seven</s>", "outputs": {"base": "forty", "tuned": "forty-seven"}}],
    }  # fmt: skip
    paths.eval_json.write_text(json.dumps(result))
    write_eval_report(result, by_model, paths.eval_dir)
    paths.timings.write_text(json.dumps({"prepare": 3.0, "train": 60.0, "serve_start": 90.0, "eval": 100.0}))
    return cfg


def test_report_structure_tables_images_and_custom_dirs(tmp_path):
    cfg = _fake_run(tmp_path)
    text = write_report(cfg).read_text()
    doc = _Doc()
    doc.feed(text)
    assert doc.h2 == [
        "Held-out pairs through the endpoint", "Sample generations (greedy)", "Training", "Data",
        "Stage wall times", "Configuration",
    ]  # fmt: skip
    cells = lambda t: {c for row in t for c in row}  # noqa: E731
    result, samples = doc.tables[0], doc.tables[1]
    assert result[0] == ["", "base", "tuned"] and ["accuracy, length-normalised", "40.0%", "100.0%"] in result
    assert any(r[0].startswith("McNemar") for r in result)
    assert samples[0] == ["prompt (end)", "reference (chosen)", "base", "tuned"] and samples[1][3] == "forty-seven"
    data = next(t for t in doc.tables if t[0][:3] == ["split", "rows read", "kept"])
    assert data[1][:4] == ["train", "10", "9", "1"]
    assert any("shard.jsonl:4" in c for t in doc.tables for c in cells(t))  # the reject's file:line example
    assert any(t[0] == ["", "mean", "p50", "p95", "max"] for t in doc.tables)  # token-length percentiles
    assert ["train", "60.0"] in next(t for t in doc.tables if t[0] == ["stage", "seconds"])
    assert any(t[0][0] == "resumed at step" for t in doc.tables)
    assert len(doc.images) == 2  # margins histogram + training curves, inlined
    for src in doc.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert doc.details == 1 and "loss_type: sigmoid" in text  # the resolved config, collapsible
    body = re.sub(r"<details>.*?</details>", "", text, flags=re.S)
    assert '{"' not in body and "&quot;rows_read" not in body  # no raw JSON dump anywhere else
