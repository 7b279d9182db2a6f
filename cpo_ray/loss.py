"""CPO loss, pure torch, with the semantics of TRL 1.16 ``CPOTrainer`` (``trl.experimental.cpo``).

Xu et al. 2024, "Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance in Machine
Translation" (arXiv:2401.08417), Sec. 3: Eq. 3 (L_prefer, as TRL cites it) and the CPO objective, both
reference-free with beta a temperature:

    L_prefer = -log sigmoid(beta * (log pi(y_w|x) - log pi(y_l|x)))
    L_NLL    = -log pi(y_w|x)            (chosen response only)
    L_CPO    = L_prefer + L_NLL          (TRL weights L_NLL by ``cpo_alpha``)

TRL's variants of L_prefer (hinge, IPO, SimPO, the AlphaPO reward shape) are kept exactly as there. Everything is
per pair, shape [B]: the caller passes one sequence log-prob per response (response tokens only, prompt masked).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cpo_ray.contract import METRIC_KEYS

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo", "alphapo")


def uses_average_logps(loss_type: str) -> bool:
    """Whether the caller must pass length-averaged (True) or summed (False) sequence log-probs.

    TRL: ``average_log_prob=self.loss_type in ["ipo", "simpo"]``; ``CPOConfig`` rewrites "alphapo" to "simpo",
    so "alphapo" averages too. The ``alpha`` reward shape does not change this.
    """
    return loss_type in ("ipo", "simpo", "alphapo")


def cpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    *,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    alpha: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair preference loss, as TRL's ``CPOTrainer.cpo_loss``.

    ``chosen_logps``/``rejected_logps``: [B] sequence log-probs of the policy, summed or averaged over response
    tokens as :func:`uses_average_logps` says. ``alpha != 0`` applies the AlphaPO reward r = (1 - p^-alpha)/alpha
    (with p = exp(logp)) to any loss type. "alphapo" is TRL's config alias of "simpo". label_smoothing is used by
    sigmoid and simpo only (TRL ignores it for hinge and ipo). Returns (losses [B], chosen_rewards [B],
    rejected_rewards [B]); rewards = beta * (log-prob or AlphaPO reward), detached, for logging.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"Unknown loss type: {loss_type!r}. Should be one of {list(LOSS_TYPES)}")
    if alpha != 0.0:
        # AlphaPO (arXiv:2501.03884): r = (1 - p^-alpha)/alpha, written as -expm1(-alpha*logp)/alpha; equal to TRL's
        # (1 - exp(logp).pow(-alpha))/alpha but without exp(logp) underflowing to 0 for long summed sequences.
        chosen_r = -torch.expm1(-alpha * chosen_logps) / alpha
        rejected_r = -torch.expm1(-alpha * rejected_logps) / alpha
    else:
        chosen_r, rejected_r = chosen_logps, rejected_logps
    logits = chosen_r - rejected_r

    if loss_type in ("simpo", "alphapo"):
        # SimPO (arXiv:2405.14734) Eq. 6 without the reference: sigmoid loss on the margin less gamma/beta.
        logits = logits - simpo_gamma / beta
        losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    elif loss_type == "sigmoid":
        # CPO Eq. 3 (label_smoothing -> 0), conservative label-smoothed form otherwise.
        losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    elif loss_type == "hinge":
        # SLiC (arXiv:2305.10425) hinge on the normalized likelihood: relu(1 - beta * logits).
        losses = torch.relu(1 - beta * logits)
    else:
        # IPO (arXiv:2310.12036) Eq. 17, beta playing tau: (logits - 1/(2 beta))^2.
        losses = (logits - 1 / (2 * beta)) ** 2

    chosen_rewards = beta * chosen_r.detach()
    rejected_rewards = beta * rejected_r.detach()
    return losses, chosen_rewards, rejected_rewards


def nll_from_token_logps(token_logp_sum: Tensor, token_count: Tensor) -> Tensor:
    """Token-mean cross-entropy of the chosen responses: -sum(logp) / sum(count) over the whole batch.

    ``token_logp_sum``: [B] summed log-probs of the chosen response tokens; ``token_count``: [B] their numbers.
    This is TRL's ``nn.CrossEntropyLoss()`` (mean over every non-ignored label of the chosen half of the batch),
    i.e. each token weighs the same, not each sequence. A batch with no tokens gives 0 (TRL would give NaN).
    """
    total = token_count.sum().to(token_logp_sum.dtype)
    return -token_logp_sum.sum() / total.clamp_min(1)


def cpo_objective(
    chosen_logp_sum: Tensor,
    rejected_logp_sum: Tensor,
    chosen_len: Tensor,
    rejected_len: Tensor,
    *,
    loss_type: str,
    beta: float,
    cpo_alpha: float,
    label_smoothing: float,
    simpo_gamma: float,
    alpha: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Scalar CPO loss of a batch and its detached metrics, as TRL's ``get_batch_loss_metrics``.

    The caller passes [B] summed response log-probs and [B] response token counts for both sides; this averages
    them (sum/len) when :func:`uses_average_logps` says so, and computes the NLL term from the summed chosen
    log-probs and counts. loss = mean(cpo_loss) + cpo_alpha * NLL. Metrics are batch means.
    """
    if loss_type == "alphapo":
        cpo_alpha = 0.0  # TRL's CPOConfig: "alphapo" -> loss_type="simpo", cpo_alpha=0.0
    if uses_average_logps(loss_type):
        chosen_logps = chosen_logp_sum / chosen_len.to(chosen_logp_sum.dtype)
        rejected_logps = rejected_logp_sum / rejected_len.to(rejected_logp_sum.dtype)
    else:
        chosen_logps, rejected_logps = chosen_logp_sum, rejected_logp_sum
    losses, chosen_rewards, rejected_rewards = cpo_loss(
        chosen_logps,
        rejected_logps,
        loss_type=loss_type,
        beta=beta,
        label_smoothing=label_smoothing,
        simpo_gamma=simpo_gamma,
        alpha=alpha,
    )
    # TRL skips the NLL (and logs nll_loss = 0) when cpo_alpha == 0.
    if cpo_alpha == 0:
        nll = torch.zeros((), dtype=losses.dtype, device=losses.device)
    else:
        nll = nll_from_token_logps(chosen_logp_sum, chosen_len)
    loss = losses.mean() + cpo_alpha * nll
    # contract.METRIC_KEYS order: loss, nll_loss, rewards/{chosen, rejected, accuracies, margins},
    # logps/{chosen, rejected}; logps as TRL logs them: the ones fed to the loss (averaged for ipo/simpo/alphapo).
    values = (
        loss.detach(),
        nll.detach(),
        chosen_rewards.mean(),
        rejected_rewards.mean(),
        (chosen_rewards > rejected_rewards).float().mean(),
        (chosen_rewards - rejected_rewards).mean(),
        chosen_logps.detach().mean(),
        rejected_logps.detach().mean(),
    )
    return loss, dict(zip(METRIC_KEYS, values, strict=True))
