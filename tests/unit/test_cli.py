"""One command line: `cpo-ray COMMAND` and jobs/*.py parse, override and fail the same way."""

import json

import pytest

from cpo_ray.cli import main, parse


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
