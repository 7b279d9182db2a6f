"""`cpo-ray prepare` and jobs/prepare.py on bad data: the same one-line message and exit code (each starts Ray)."""

import subprocess
import sys
from pathlib import Path

from conftest import ROOT


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
