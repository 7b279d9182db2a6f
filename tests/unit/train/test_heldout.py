"""The in-training held-out scores: summed AND length-normalised accuracy, margin, chosen NLL (issue 21 item 9)."""

import pytest
import torch

from cpo_ray.contract import CHOSEN_IDS, PROMPT_IDS, REJECTED_IDS
from cpo_ray.train.heldout import score_heldout


class _Scores(torch.nn.Module):
    """Stands in for the DeepSpeed engine: returns given sequence log-probs in the trainer's order (the chosen
    responses, then each prompt's rejected ones). The arithmetic on them is what is tested."""

    device = torch.device("cpu")

    def __init__(self, logps):
        super().__init__()
        self.logps = torch.tensor(logps, dtype=torch.float64)

    def forward(self, batch):
        return self.logps, None


def test_length_normalised_accuracy_is_logged_next_to_the_summed_one():
    rows = [
        # summed: chosen -10 < rejected -4 (loses); per token: -1.0 > -2.0 (wins)
        {PROMPT_IDS: [5], CHOSEN_IDS: list(range(3, 13)), REJECTED_IDS: [[7, 8]], "index": 0},
        # wins both ways
        {PROMPT_IDS: [6], CHOSEN_IDS: [3, 4], REJECTED_IDS: [[9, 9]], "index": 1},
    ]
    engine = _Scores([-10.0, -1.0, -4.0, -3.0])
    scores, per_pair = score_heldout(engine, rows, batch_size=8, collate=lambda b: b, pad_id=0, world=1)
    assert scores["eval/accuracy"] == 0.5
    assert scores["eval/accuracy_length_normalised"] == 1.0
    assert scores["eval/margin"] == pytest.approx(((-10 + 4) + (-1 + 3)) / 2)
    assert scores["eval/nll"] == pytest.approx(11 / 12)  # token mean over the chosen responses
    assert scores["eval/n"] == 2 and [p["index"] for p in per_pair] == [0, 1]
    assert [p["correct_norm"] for p in per_pair] == [True, True]
