"""cpo_ray.sweep's pure parts: the search space from sweep.params, and each trial's config."""

from __future__ import annotations

import pytest
from ray import tune

from cpo_ray.config import ConfigError, load_config
from cpo_ray.sweep import concurrency, search_space, trial_config


def test_search_space_grids_and_sampled_specs():
    space = search_space(
        {
            "train.beta": [0.05, 0.1],
            "train.lr": "loguniform(1e-5, 1e-3)",  # YAML 1.1 would read these as strings
            "train.cpo_alpha": "uniform(0.5, 1.5)",
            "train.micro_batch_size": "randint(1, 4)",
            "train.loss_type": "choice(['sigmoid', 'hinge'])",
        }
    )
    assert space["train.beta"] == {"grid_search": [0.05, 0.1]}
    lr = space["train.lr"]
    assert isinstance(lr, tune.search.sample.Float) and (lr.lower, lr.upper) == (1e-5, 1e-3)
    draws = [lr.sample() for _ in range(200)]
    assert all(1e-5 <= d <= 1e-3 for d in draws) and min(draws) < 1e-4 < max(draws)  # log-spread
    assert space["train.loss_type"].categories == ["sigmoid", "hinge"]
    with pytest.raises(ConfigError, match=r"sweep.params.train.lr: 'log\(1, 2\)'"):
        search_space({"train.lr": "log(1, 2)"})


def test_trial_config_rederives_lengths_and_shares_the_prepared_data(tmp_path):
    cfg = load_config(None, [f"output_dir={tmp_path}", "name=sw", "train.eval_every=5", "train.checkpoint_every=7"])
    assert cfg.serve.max_model_len == cfg.data.max_length + cfg.eval.max_new_tokens  # derived, not set
    tc = trial_config(cfg, {"data.max_length": 1500, "train.beta": 0.5}, "t1")
    # a derived max_model_len follows the trial's longer pairs instead of refusing them
    assert tc.serve.max_model_len == 1500 + cfg.eval.max_new_tokens and tc.train.beta == 0.5
    assert tc.name == "sw-t1" and tc.output_dir == str(tmp_path / "trials" / "t1")
    assert tc.data.output_dir == str(tmp_path / "data")  # prepared once, read by every trial
    assert tc.train.report_every == 5 and tc.train.checkpoint_every == 10  # reports and checkpoints on evaluations
    pinned = load_config(None, [f"output_dir={tmp_path}", "serve.max_model_len=1200"])
    with pytest.raises(Exception, match="serve.max_model_len=1200 is shorter"):
        trial_config(pinned, {"data.max_length": 1500}, "t2")  # a value the user set is kept, and checked


def test_concurrency_leaves_each_trial_a_whole_cpu_for_its_data_reads():
    # the tiny-cpu-sweep config as first written: two 0.5-CPU trials on 2 cores, each waited forever for data
    over = ["train.num_workers=1", "train.cpus_per_worker=0.5", "sweep.params={train.beta: [0.1, 0.5]}"]
    cfg = load_config(None, [*over, "sweep.max_concurrent_trials=2"])
    with pytest.raises(ConfigError, match=r"max_concurrent_trials=2: .* 3 in all, and the cluster has 2: at most 1"):
        concurrency(cfg, {"CPU": 2.0})
    assert concurrency(cfg, {"CPU": 3.0}) == 2
    auto = load_config(None, over)
    assert concurrency(auto, {"CPU": 2.0}) == 1 and concurrency(auto, {"CPU": 16.0}) == 10
    gpu = load_config(None, ["train.num_workers=2", "train.use_gpu=true", "sweep.params={train.beta: [0.1]}"])
    assert concurrency(gpu, {"CPU": 64.0, "GPU": 4.0}) == 2
