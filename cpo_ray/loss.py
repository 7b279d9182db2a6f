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

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo", "alphapo")  # TRL CPOTrainer's, pairwise
INFONCE = "infonce"  # cpo-ray's multi-negative loss (infonce_loss)


def uses_average_logps(loss_type: str, length_normalize: bool = False) -> bool:
    """Whether the caller must pass length-averaged (True) or summed (False) sequence log-probs.

    TRL: ``average_log_prob=self.loss_type in ["ipo", "simpo"]``; ``CPOConfig`` rewrites "alphapo" to "simpo",
    so "alphapo" averages too. The ``alpha`` reward shape does not change this. "infonce" averages when asked
    (train.length_normalize).
    """
    return loss_type in ("ipo", "simpo", "alphapo") or (loss_type == INFONCE and length_normalize)


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


def infonce_loss(chosen_logps: Tensor, rejected_logps: Tensor, rejected_group: Tensor, beta: float) -> Tensor:
    """Multi-negative contrastive term, one per prompt: the InfoNCE loss (van den Oord et al. 2018) over the
    chosen response and its K rejected ones, with CPO's temperature beta and no reference model:

        L_i = -log( exp(beta s_w) / (exp(beta s_w) + sum_k exp(beta s_lk)) )

    (the K-negative Plackett-Luce first-choice loss; with K = 1 it is exactly -log sigmoid(beta (s_w - s_l)),
    CPO's L_prefer). `rejected_group[j]` is the prompt of rejected j; groups may have different K. Returns [B].
    """
    n = chosen_logps.shape[0]
    k = torch.bincount(rejected_group, minlength=n)
    first = torch.cumsum(k, 0) - k  # each group's first rejected (rejected come grouped, in prompt order)
    slot = torch.arange(len(rejected_group), device=rejected_group.device) - first[rejected_group]
    logits = torch.full(
        (n, 1 + int(k.max()) if len(k) else 1), float("-inf"), dtype=chosen_logps.dtype, device=chosen_logps.device
    )
    logits[:, 0] = beta * chosen_logps
    logits[rejected_group, 1 + slot] = beta * rejected_logps
    return torch.logsumexp(logits, dim=1) - logits[:, 0]


def _group_mean(values: Tensor, group: Tensor, n: int) -> Tensor:
    """Per-group mean of values [R] (group[j] in 0..n-1), [n]."""
    total = torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, group, values)
    return total / torch.bincount(group, minlength=n).clamp_min(1).to(values.dtype)


def sft_objective(chosen_logp_sum: Tensor, chosen_len: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """The warm-start phase (train.sft_steps): NLL of the chosen responses only, token-mean cross-entropy as in
    the CPO objective's second term. Preference metrics have no value here: NaN (left out of metrics.jsonl)."""
    nll = nll_from_token_logps(chosen_logp_sum, chosen_len)
    nan = torch.full((), float("nan"), dtype=nll.dtype, device=nll.device)
    values = {k: nan for k in METRIC_KEYS}
    values |= {"loss": nll.detach(), "nll_loss": nll.detach(), "logps/chosen": chosen_logp_sum.detach().mean()}
    return nll, values


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
    rejected_group: Tensor | None = None,
    length_normalize: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Scalar CPO loss of a batch and its detached metrics, as TRL's ``get_batch_loss_metrics``.

    The caller passes [B] summed chosen log-probs and token counts, and [R] for the rejected responses with
    `rejected_group` [R] naming each one's prompt (None: one rejected per prompt, R = B, in order). Log-probs
    are averaged (sum/len) when :func:`uses_average_logps` says so. Pairwise losses (TRL's) are averaged over
    a prompt's K rejected responses, then over prompts; "infonce" is one term per prompt. loss = mean + cpo_alpha
    * NLL(chosen). Metrics are means over prompts (rewards/chosen, accuracies: the chosen beats its hardest,
    i.e. every, rejected) or over rejected responses (rewards/rejected, margins, pair_accuracies).
    """
    n = chosen_logp_sum.shape[0]
    group = torch.arange(n, device=chosen_logp_sum.device) if rejected_group is None else rejected_group
    if loss_type == "alphapo":
        cpo_alpha = 0.0  # TRL's CPOConfig: "alphapo" -> loss_type="simpo", cpo_alpha=0.0
    if uses_average_logps(loss_type, length_normalize):
        chosen_logps = chosen_logp_sum / chosen_len.to(chosen_logp_sum.dtype)
        rejected_logps = rejected_logp_sum / rejected_len.to(rejected_logp_sum.dtype)
    else:
        chosen_logps, rejected_logps = chosen_logp_sum, rejected_logp_sum
    if loss_type == INFONCE:
        per_prompt = infonce_loss(chosen_logps, rejected_logps, group, beta)
        chosen_rewards, rejected_rewards = beta * chosen_logps.detach(), beta * rejected_logps.detach()
    else:
        losses, chosen_rewards, rejected_rewards = cpo_loss(
            chosen_logps[group],
            rejected_logps,
            loss_type=loss_type,
            beta=beta,
            label_smoothing=label_smoothing,
            simpo_gamma=simpo_gamma,
            alpha=alpha,
        )
        per_prompt = _group_mean(losses, group, n)
        chosen_rewards = torch.zeros(n, dtype=chosen_rewards.dtype, device=chosen_rewards.device).index_copy_(
            0, group, chosen_rewards
        )
    # TRL skips the NLL (and logs nll_loss = 0) when cpo_alpha == 0.
    if cpo_alpha == 0:
        nll = torch.zeros((), dtype=per_prompt.dtype, device=per_prompt.device)
    else:
        nll = nll_from_token_logps(chosen_logp_sum, chosen_len)
    loss = per_prompt.mean() + cpo_alpha * nll
    hardest = torch.full_like(chosen_rewards, float("-inf")).scatter_reduce(0, group, rejected_rewards, reduce="amax")
    beats = (chosen_rewards[group] > rejected_rewards).float()
    values = {
        "loss": loss.detach(),
        "nll_loss": nll.detach(),
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > hardest).float().mean(),
        "rewards/pair_accuracies": beats.mean(),
        "rewards/margins": (chosen_rewards[group] - rejected_rewards).mean(),
        # As TRL: the log-probs fed to the loss, so length-averaged for ipo/simpo/alphapo, summed otherwise.
        "logps/chosen": chosen_logps.detach().mean(),
        "logps/rejected": rejected_logps.detach().mean(),
    }
    return loss, {k: values[k] for k in METRIC_KEYS}
