"""One command line: `cpo-ray COMMAND` and jobs/*.py parse, override and fail the same way."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cpo_ray.cli import main, parse

ROOT = Path(__file__).resolve().parents[1]


def test_each_command_has_its_own_options(capsys):
    args = parse(["eval", "--endpoint", "http://x/v1", "eval.concurrency=2", "--model", "base", "--model", "tuned"])
    assert (
        args.endpoint == "http://x/v1" and args.model == ["base", "tuned"] and args.overrides == ["eval.concurrency=2"]
    )
    with pytest.raises(SystemExit) as e:  # an eval option on train is an error, not silently accepted
        parse(["train", "--endpoint", "http://x/v1"])
    assert e.value.code == 2 and "unrecognized arguments: --endpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        parse(["nope"])
    assert e.value.code == 2


def test_overrides_anywhere_and_print_config(capsys):
    code = main(["train", "train.lr=2e-5", "--config", "configs/tiny-cpu.yaml", "train.max_steps=7", "--print-config"])
    assert code == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["train"]["lr"] == 2e-5 and cfg["train"]["max_steps"] == 7 and cfg["name"] == "tiny-cpu"


def test_config_errors_exit_2_with_the_key(capsys):
    assert main(["prepare", "train.lrr=1"]) == 2
    assert "train.lrr: unknown key" in capsys.readouterr().err
    assert main(["eval"]) == 2  # no endpoint / model
    assert "needs --endpoint" in capsys.readouterr().err


@pytest.mark.integration
def test_bad_data_file_same_message_and_exit_code_through_cli_and_job(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join('{"prompt": "q", "chosen": 5, "rejected": "x"}\n' for _ in range(10)))
    over = [f"output_dir={tmp_path / 'run'}", f"data.train_files=[{bad}]"]
    env = {"RAY_ADDRESS": "local", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    runs = [
        subprocess.run([sys.executable, "-m", "cpo_ray.cli", "prepare", *over], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300),
        subprocess.run([sys.executable, "jobs/prepare.py", *over], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300),
    ]  # fmt: skip
    lines = [[ln for ln in r.stderr.splitlines() if ln.startswith("cpo-ray prepare:")] for r in runs]
    assert [r.returncode for r in runs] == [1, 1], [r.stderr[-2000:] for r in runs]
    assert lines[0] == lines[1] and len(lines[0]) == 1, lines
    assert "10/10 rows rejected" in lines[0][0] and "not_string" in lines[0][0]
