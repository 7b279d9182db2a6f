"""cpo_ray.train.loss: hand-worked values per loss type, the NLL term, log-prob averaging, and TRL parity."""

from __future__ import annotations

import ast
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from cpo_ray.contract import METRIC_KEYS
from cpo_ray.train.loss import LOSS_TYPES, Objective, PolicyLogps, cpo_loss, nll_from_token_logps, uses_average_logps


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


def objective(chosen, rejected, c_len, r_len, rejected_group=None, **kw):
    """The Objective with its hyperparameters bound, called on the typed input (chosen [B], rejected [R])."""
    args = dict(loss_type="sigmoid", beta=0.1, cpo_alpha=1.0, label_smoothing=0.0, simpo_gamma=0.5, alpha=0.0)
    group = torch.arange(len(chosen)) if rejected_group is None else rejected_group
    return Objective(**(args | kw))(PolicyLogps(chosen, rejected, c_len, r_len, group))


def test_uses_average_logps():
    # TRL: average_log_prob = loss_type in ["ipo", "simpo"]; CPOConfig maps "alphapo" to "simpo".
    assert [uses_average_logps(lt) for lt in LOSS_TYPES] == [False, False, True, True, True]


def test_sigmoid_by_hand():
    """chosen=-2, rejected=-4, beta=0.1: logits=2, beta*logits=0.2.

    loss = -log sigmoid(0.2) = log(1 + e^-0.2) = log(1.8187307531) = 0.5981388694
    rewards = beta * logps = -0.2, -0.4
    """
    losses, cr, rr = cpo_loss(t(-2.0), t(-4.0), loss_type="sigmoid", beta=0.1)
    assert_close(losses, t(0.5981388693815918))
    assert_close(cr, t(-0.2))
    assert_close(rr, t(-0.4))


def test_sigmoid_label_smoothing_by_hand():
    """As above with label_smoothing=0.1.

    loss = 0.9 * log(1 + e^-0.2) + 0.1 * log(1 + e^0.2), and log(1 + e^0.2) = 0.2 + log(1 + e^-0.2), so
    loss = log(1 + e^-0.2) + 0.1 * 0.2 = 0.5981388694 + 0.02 = 0.6181388694
    """
    losses, _, _ = cpo_loss(t(-2.0), t(-4.0), loss_type="sigmoid", beta=0.1, label_smoothing=0.1)
    assert_close(losses, t(0.6181388693815918))


def test_hinge_by_hand():
    """beta=0.1. Pair 1: logits=-2-(-4)=2, relu(1 - 0.2) = 0.8. Pair 2: logits=-1-(-15)=14, relu(1 - 1.4) = 0.

    label_smoothing is ignored for hinge, as in TRL.
    """
    losses, cr, rr = cpo_loss(t(-2.0, -1.0), t(-4.0, -15.0), loss_type="hinge", beta=0.1, label_smoothing=0.3)
    assert_close(losses, t(0.8, 0.0))
    assert_close(cr, t(-0.2, -0.1))
    assert_close(rr, t(-0.4, -1.5))


def test_ipo_by_hand():
    """beta=0.1, so 1/(2 beta) = 5. Pair 1: logits=-1-(-3)=2, (2-5)^2 = 9. Pair 2: logits=-0.5-(-6)=5.5, 0.5^2=0.25."""
    losses, cr, rr = cpo_loss(t(-1.0, -0.5), t(-3.0, -6.0), loss_type="ipo", beta=0.1)
    assert_close(losses, t(9.0, 0.25))
    assert_close(cr, t(-0.1, -0.05))
    assert_close(rr, t(-0.3, -0.6))


def test_simpo_by_hand():
    """beta=2, simpo_gamma=0.5, so gamma/beta = 0.25. chosen=-1, rejected=-1.5 (already averaged): logits=0.5.

    logits - 0.25 = 0.25; beta * 0.25 = 0.5; loss = log(1 + e^-0.5) = log(1.6065306597) = 0.4740769842
    rewards = beta * logps = -2, -3
    """
    losses, cr, rr = cpo_loss(t(-1.0), t(-1.5), loss_type="simpo", beta=2.0, simpo_gamma=0.5)
    assert_close(losses, t(0.4740769841801067))
    assert_close(cr, t(-2.0))
    assert_close(rr, t(-3.0))


def test_alphapo_by_hand():
    """alpha=0.5, r = (1 - p^-alpha)/alpha. chosen logp = -ln 4: p=1/4, p^-0.5 = 2, r = (1-2)/0.5 = -2.
    rejected logp = -ln 16: p^-0.5 = 4, r = (1-4)/0.5 = -6. logits = 4.

    "alphapo" is SimPO: beta=1, gamma=1 -> logits - 1 = 3; loss = log(1 + e^-3) = 0.0485873516
    rewards = beta * r = -2, -6
    """
    losses, cr, rr = cpo_loss(
        t(-math.log(4)), t(-math.log(16)), loss_type="alphapo", beta=1.0, simpo_gamma=1.0, alpha=0.5
    )
    assert_close(losses, t(0.04858735157374206))
    assert_close(cr, t(-2.0))
    assert_close(rr, t(-6.0))


def test_unknown_loss_type():
    with pytest.raises(ValueError, match="sigmoid.*hinge.*ipo.*simpo.*alphapo"):
        cpo_loss(t(-1.0), t(-2.0), loss_type="kto_pair")


def test_nll_is_batch_token_mean_and_cpo_alpha_zero_removes_it():
    """Chosen sums -3 (2 tokens) and -5 (3 tokens): NLL = (3 + 5) / (2 + 3) = 1.6 (mean of means would be 1.583)."""
    chosen, rejected, c_len, r_len = t(-3.0, -5.0), t(-4.0, -9.0), t(2, 3), t(4, 4)
    assert_close(nll_from_token_logps(chosen, c_len), t(1.6)[0])
    pref, _, _ = cpo_loss(chosen, rejected, loss_type="sigmoid", beta=0.1)
    loss, m = objective(chosen, rejected, c_len, r_len, cpo_alpha=1.0)
    assert_close(m["nll_loss"], t(1.6)[0])
    assert_close(loss, pref.mean() + 1.6)
    loss0, m0 = objective(chosen, rejected, c_len, r_len, cpo_alpha=0.0)
    assert_close(loss0, pref.mean())
    assert m0["nll_loss"].item() == 0.0  # TRL logs 0 when cpo_alpha == 0
    # alphapo means cpo_alpha = 0, as TRL's CPOConfig: resolved by the config, so the saved config is what ran
    from cpo_ray.config import TrainConfig

    tc = TrainConfig(loss_type="alphapo", alpha=0.5)
    assert tc.cpo_alpha == 0.0
    _, ma = Objective.from_config(tc)(PolicyLogps(chosen, rejected, c_len, r_len, torch.arange(2)))
    assert ma["nll_loss"].item() == 0.0
    with pytest.raises(ValueError, match="alphapo trains without the NLL"):
        TrainConfig(loss_type="alphapo", alpha=0.5, cpo_alpha=1.0)


def test_nll_matches_cross_entropy_with_ignore_index():
    """TRL's NLL is nn.CrossEntropyLoss() over the chosen labels (-100 ignored): the batch token mean."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[0, :2] = labels[1, :5] = labels[2, 6:] = -100  # prompt / padding of different lengths
    mask = labels != -100
    tok = torch.log_softmax(logits, -1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1) * mask
    expected = torch.nn.CrossEntropyLoss()(logits.view(-1, 11), labels.view(-1))
    assert_close(nll_from_token_logps(tok.sum(-1), mask.sum(-1)), expected)


def test_averaging_only_for_ipo_and_simpo():
    """Same sums, different lengths: ipo/simpo/alphapo (averaged) change, sigmoid/hinge (summed) do not."""
    chosen, rejected = t(-4.0, -6.0), t(-8.0, -9.0)
    short, long_ = t(2, 3), t(8, 9)
    for lt in LOSS_TYPES:
        kw = dict(loss_type=lt, cpo_alpha=0.0, alpha=0.5 if lt == "alphapo" else 0.0)
        a, ma = objective(chosen, rejected, short, short, **kw)
        b, mb = objective(chosen, rejected, short, long_, **kw)
        assert (a.item() != b.item()) == uses_average_logps(lt), lt
        if uses_average_logps(lt):
            assert_close(ma["logps/chosen"], (chosen / short).mean())  # TRL logs the averaged logps
        else:
            assert_close(ma["logps/chosen"], chosen.mean())


def test_metrics():
    chosen, rejected, c_len, r_len = t(-2.0, -6.0), t(-4.0, -5.0), t(2, 3), t(4, 4)
    loss, m = objective(chosen, rejected, c_len, r_len, beta=0.1)
    assert set(m) == set(METRIC_KEYS)
    assert_close(m["rewards/chosen"], t(-0.4)[0])
    assert_close(m["rewards/rejected"], t(-0.45)[0])
    assert_close(m["rewards/margins"], t(0.05)[0])
    assert_close(m["rewards/accuracies"], t(0.5)[0].float())
    assert_close(m["loss"], loss)
    assert not any(v.requires_grad for v in m.values())


def test_gradients():
    for lt in LOSS_TYPES:
        chosen = t(-3.0, -7.0).requires_grad_()
        rejected = t(-5.0, -6.0).requires_grad_()
        loss, _ = objective(chosen, rejected, t(2, 3), t(4, 4), loss_type=lt, alpha=0.3 if lt == "alphapo" else 0)
        loss.backward()
        assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all(), lt
        if lt == "sigmoid":
            assert (chosen.grad < 0).all() and (rejected.grad > 0).all()


@pytest.fixture(scope="module")
def trl_cpo_loss():
    """TRL's own ``CPOTrainer.cpo_loss``, compiled from the installed trl source.

    Importing ``trl.experimental.cpo`` pulls in transformers and peft (~9 s here), so the method is taken out of
    ``cpo_trainer.py`` with ast and compiled unchanged with the names it uses (torch, F).
    """
    trl = pytest.importorskip("trl")
    path = Path(trl.__file__).parent / "experimental" / "cpo" / "cpo_trainer.py"
    if not path.exists():
        pytest.skip(f"no {path}")
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CPOTrainer")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "cpo_loss")
    ns = {"torch": torch, "F": F}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(path), "exec"), ns)
    return ns["cpo_loss"]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("alpha", [0.0, 0.3, -0.2])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
def test_matches_trl(trl_cpo_loss, loss_type, alpha, label_smoothing):
    g = torch.Generator().manual_seed(LOSS_TYPES.index(loss_type))
    chosen = -3 * torch.rand(16, generator=g, dtype=torch.float64) - 0.05
    rejected = -3 * torch.rand(16, generator=g, dtype=torch.float64) - 0.05
    kw = dict(beta=0.7, label_smoothing=label_smoothing, simpo_gamma=0.4, alpha=alpha)
    # the attributes cpo_loss reads; CPOConfig turns "alphapo" into "simpo"
    stand_in = SimpleNamespace(
        loss_type="simpo" if loss_type == "alphapo" else loss_type,
        accelerator=SimpleNamespace(device=torch.device("cpu")),
        **kw,
    )
    expected = trl_cpo_loss(stand_in, chosen, rejected)
    got = cpo_loss(chosen, rejected, loss_type=loss_type, **kw)
    for e, o in zip(expected, got, strict=True):
        assert_close(o, e)


def test_infonce_with_one_negative_is_sigmoid_cpo():
    """K = 1: -log(e^{b s_w} / (e^{b s_w} + e^{b s_l})) = -log sigmoid(b (s_w - s_l)): the same loss, NLL and
    metrics as loss_type=sigmoid."""
    chosen, rejected, c_len, r_len = t(-2.0, -6.0, -1.5), t(-4.0, -5.0, -9.0), t(2, 3, 1), t(4, 4, 5)
    want = objective(chosen, rejected, c_len, r_len, loss_type="sigmoid", beta=0.3)
    got = objective(chosen, rejected, c_len, r_len, loss_type="infonce", beta=0.3)
    assert_close(got[0], want[0])
    for k in METRIC_KEYS:
        assert_close(got[1][k], want[1][k], msg=k)


def test_infonce_by_hand_with_two_negatives():
    """One prompt, s_w = -2, s_l = (-4, -3), beta = 1, cpo_alpha = 0:
    L = log(e^-2 + e^-4 + e^-3) - (-2) = log(1 + e^-2 + e^-1) = log(1.5032147244) = 0.4076059644."""
    from cpo_ray.train.loss import infonce_loss

    assert_close(infonce_loss(t(-2.0), t(-4.0, -3.0), torch.tensor([0, 0]), beta=1.0), t(0.40760596444438))
    # two prompts with 2 and 1 negatives: each prompt's own term (the second is -log sigmoid(1 * (-1 - -2)))
    out = infonce_loss(t(-2.0, -1.0), t(-4.0, -3.0, -2.0), torch.tensor([0, 0, 1]), beta=1.0)
    assert_close(out, t(0.40760596444438, math.log(1 + math.exp(-1.0))))


def test_pairwise_losses_average_a_prompts_negatives_and_metrics_split_hardest_and_pairs():
    """sigmoid, beta = 1, cpo_alpha = 0. Prompt 0: s_w = -2 vs (-4, -1); prompt 1: s_w = -3 vs (-5).
    Pair losses: log(1+e^-2) = 0.1269280110, log(1+e^1) = 1.3132616875, log(1+e^-2) = 0.1269280110.
    Per prompt: (0.1269280110 + 1.3132616875) / 2 = 0.7200948493 and 0.1269280110; loss = 0.4235114301.
    accuracies (beats the hardest): prompt 0 loses to -1 -> 0.5; pair_accuracies: 2 of 3 pairs won.
    margins: mean of (2, -1, 2) = 1; rewards/rejected: mean of (-4, -1, -5) = -10/3."""
    chosen, rejected, group = t(-2.0, -3.0), t(-4.0, -1.0, -5.0), torch.tensor([0, 0, 1])
    loss, m = objective(chosen, rejected, t(1, 1), t(1, 1, 1), rejected_group=group, beta=1.0, cpo_alpha=0.0)
    assert_close(loss, t(0.4235114301)[0], atol=1e-9, rtol=0)
    assert_close(m["rewards/accuracies"], t(0.5)[0].float())
    assert_close(m["rewards/pair_accuracies"], t(2 / 3)[0].float())
    assert_close(m["rewards/margins"], t(1.0)[0])
    assert_close(m["rewards/rejected"], t(-10 / 3)[0])
    assert_close(m["rewards/chosen"], t(-2.5)[0])
    # the same rows split into one-negative pairs: the pairs' mean, not the prompts' (prompt 0 weighs double)
    split, _ = objective(t(-2.0, -2.0, -3.0), rejected, t(1, 1, 1), t(1, 1, 1), beta=1.0, cpo_alpha=0.0)
    assert_close(split, t((0.1269280110 + 1.3132616875 + 0.1269280110) / 3)[0], atol=1e-9, rtol=0)


def test_sft_objective_is_the_chosen_nll_alone():
    """Chosen sums -4, -6 over 2 + 3 tokens: token-mean NLL = 10 / 5 = 2; no preference metrics (NaN)."""
    loss, m = Objective.sft(PolicyLogps(t(-4.0, -6.0), t(), t(2, 3), t(), torch.zeros(0, dtype=torch.long)))
    assert_close(loss, t(2.0)[0]) and assert_close(m["nll_loss"], t(2.0)[0])
    assert_close(m["logps/chosen"], t(-5.0)[0])
    assert math.isnan(m["rewards/accuracies"]) and set(m) == set(METRIC_KEYS)
