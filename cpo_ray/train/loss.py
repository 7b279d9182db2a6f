"""CPO loss, pure torch, with the semantics of TRL 1.16 ``CPOTrainer`` (``trl.experimental.cpo``).

Xu et al. 2024, "Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance in Machine
Translation" (arXiv:2401.08417), Sec. 3: Eq. 3 (L_prefer, as TRL cites it) and the CPO objective, both
reference-free with beta a temperature:

    L_prefer = -log sigmoid(beta * (log pi(y_w|x) - log pi(y_l|x)))
    L_NLL    = -log pi(y_w|x)            (chosen response only)
    L_CPO    = L_prefer + L_NLL          (TRL weights L_NLL by ``cpo_alpha``)

TRL's variants of L_prefer (hinge, IPO, SimPO, the AlphaPO reward shape) are kept exactly as there, plus
cpo-ray's K-negative InfoNCE. The training step uses ONE object with its hyperparameters bound once:

    objective = Objective.from_config(cfg.train)
    loss, metrics = objective(PolicyLogps.split(logp, count, batch["num_chosen"], batch["rejected_group"]))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cpo_ray.contract import METRIC_KEYS, LossType

LOSS_TYPES = tuple(t for t in LossType if t is not LossType.INFONCE)  # TRL CPOTrainer's, pairwise
AVERAGED = (LossType.IPO, LossType.SIMPO, LossType.ALPHAPO)  # losses on length-averaged log-probs


def uses_average_logps(loss_type: str, length_normalize: bool = False) -> bool:
    """Whether the caller must pass length-averaged (True) or summed (False) sequence log-probs.

    TRL: ``average_log_prob=self.loss_type in ["ipo", "simpo"]``; ``CPOConfig`` rewrites "alphapo" to "simpo",
    so "alphapo" averages too. The ``alpha`` reward shape does not change this. "infonce" averages when asked
    (train.length_normalize).
    """
    return loss_type in AVERAGED or (loss_type == LossType.INFONCE and length_normalize)


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
        raise ValueError(f"Unknown loss type: {loss_type!r}. Should be one of {[str(t) for t in LOSS_TYPES]}")
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


def nll_from_token_logps(token_logp_sum: Tensor, token_count: Tensor, denominator: float | None = None) -> Tensor:
    """Token-mean cross-entropy of the chosen responses: -sum(logp) / sum(count) over the whole batch.

    ``token_logp_sum``: [B] summed log-probs of the chosen response tokens; ``token_count``: [B] their numbers.
    This is TRL's ``nn.CrossEntropyLoss()`` (mean over every non-ignored label of the chosen half of the batch),
    i.e. each token weighs the same, not each sequence. A batch with no tokens gives 0 (TRL would give NaN).
    ``denominator`` replaces this batch's own token count: the trainer passes the WHOLE step's chosen tokens
    (all micro-batches, all ranks) scaled by the number of micro-batches averaged, so that any split of a step
    gives the gradient of one token mean over the step (cpo_ray.train.worker).
    """
    total = token_count.sum().to(token_logp_sum.dtype) if denominator is None else denominator
    if denominator is None:
        return -token_logp_sum.sum() / total.clamp_min(1)
    return -token_logp_sum.sum() / max(float(total), 1e-12)


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


@dataclass(frozen=True)
class PolicyLogps:
    """One forward's sequence log-probs, split into the chosen responses and the rejected ones.

    chosen [B], chosen_len [B]: summed log-prob and token count of each prompt's chosen response;
    rejected [R], rejected_len [R]: the same for the R = sum K_b rejected responses, grouped by prompt in order;
    rejected_group [R]: the prompt (0..B-1) of each rejected response.
    """

    chosen: Tensor
    rejected: Tensor
    chosen_len: Tensor
    rejected_len: Tensor
    rejected_group: Tensor

    @classmethod
    def split(cls, logp: Tensor, count: Tensor, num_chosen: int, rejected_group: Tensor | None = None) -> PolicyLogps:
        """From sequence_logps' [B + R] outputs (chosen first); rejected_group None = one rejected per prompt."""
        b = num_chosen
        group = torch.arange(b) if rejected_group is None else rejected_group
        return cls(logp[:b], logp[b:], count[:b], count[b:], group.to(logp.device))

    @property
    def num_prompts(self) -> int:
        return self.chosen.shape[0]


class Objective(torch.nn.Module):
    """The training objective with its hyperparameters bound once (TRL CPOTrainer's ``get_batch_loss_metrics``).

    Args (the paper's / TRL's defaults in cpo_ray.config.TrainConfig):
        loss_type: a LossType. Pairwise losses are averaged over a prompt's K rejected responses, then over
            prompts; "infonce" is one term per prompt.
        beta: temperature of the preference term (paper: 0.1).
        cpo_alpha: weight of the chosen NLL (paper: 1; TRL skips the term at 0). AlphaPO's 0 is set by the config.
        label_smoothing: sigmoid/simpo only.
        simpo_gamma: simpo/alphapo target margin, applied as gamma/beta.
        alpha: AlphaPO reward shape (0 = plain log-prob reward).
        length_normalize: infonce on length-averaged log-probs (ipo/simpo/alphapo always average).

    forward(logps) -> (loss [], metrics {METRIC_KEYS: detached scalars}); `sft(logps)` is the warm-start phase.
    Metrics are means over prompts (rewards/chosen, accuracies: the chosen beats its hardest, i.e. every,
    rejected) or over rejected responses (rewards/rejected, margins, pair_accuracies).
    """

    def __init__(
        self,
        loss_type: str = LossType.SIGMOID,
        beta: float = 0.1,
        cpo_alpha: float = 1.0,
        label_smoothing: float = 0.0,
        simpo_gamma: float = 0.5,
        alpha: float = 0.0,
        length_normalize: bool = False,
    ):
        super().__init__()
        self.loss_type = LossType(loss_type)
        self.beta, self.cpo_alpha, self.label_smoothing = beta, cpo_alpha, label_smoothing
        self.simpo_gamma, self.alpha, self.length_normalize = simpo_gamma, alpha, length_normalize
        self.averaged = uses_average_logps(self.loss_type, length_normalize)

    @classmethod
    def from_config(cls, t) -> Objective:
        """From a cpo_ray.config.TrainConfig (whose validator already resolved alphapo's cpo_alpha)."""
        return cls(t.loss_type, t.beta, t.cpo_alpha, t.label_smoothing, t.simpo_gamma, t.alpha, t.length_normalize)

    def forward(self, logps: PolicyLogps, nll_denominator: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """`nll_denominator`: what the chosen NLL's summed log-probs are divided by (nll_from_token_logps);
        None = this batch's own chosen tokens (one batch = one step)."""
        n, group, beta = logps.num_prompts, logps.rejected_group, self.beta
        if self.averaged:
            chosen = logps.chosen / logps.chosen_len.to(logps.chosen.dtype)
            rejected = logps.rejected / logps.rejected_len.to(logps.rejected.dtype)
        else:
            chosen, rejected = logps.chosen, logps.rejected
        if self.loss_type == LossType.INFONCE:
            per_prompt = infonce_loss(chosen, rejected, group, beta)
            chosen_rewards, rejected_rewards = beta * chosen.detach(), beta * rejected.detach()
        else:
            losses, chosen_rewards, rejected_rewards = cpo_loss(
                chosen[group],
                rejected,
                loss_type=self.loss_type,
                beta=beta,
                label_smoothing=self.label_smoothing,
                simpo_gamma=self.simpo_gamma,
                alpha=self.alpha,
            )
            per_prompt = _group_mean(losses, group, n)
            chosen_rewards = torch.zeros(n, dtype=chosen_rewards.dtype, device=chosen_rewards.device).index_copy_(
                0, group, chosen_rewards
            )
        # TRL skips the NLL (and logs nll_loss = 0) when cpo_alpha == 0.
        if self.cpo_alpha == 0:
            nll = torch.zeros((), dtype=per_prompt.dtype, device=per_prompt.device)
        else:
            nll = nll_from_token_logps(logps.chosen, logps.chosen_len, nll_denominator)
        loss = per_prompt.mean() + self.cpo_alpha * nll
        hardest = torch.full_like(chosen_rewards, float("-inf")).scatter_reduce(
            0, group, rejected_rewards, reduce="amax"
        )
        values = {
            "loss": loss.detach(),
            "nll_loss": nll.detach(),
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > hardest).float().mean(),
            "rewards/pair_accuracies": (chosen_rewards[group] > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards[group] - rejected_rewards).mean(),
            # As TRL: the log-probs fed to the loss, so length-averaged for ipo/simpo/alphapo, summed otherwise.
            "logps/chosen": chosen.detach().mean(),
            "logps/rejected": rejected.detach().mean(),
        }
        return loss, {k: values[k] for k in METRIC_KEYS}

    @staticmethod
    def sft(logps: PolicyLogps, nll_denominator: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """The warm-start phase (train.sft_steps): NLL of the chosen responses only, token-mean cross-entropy as
        in the objective's second term (the same `nll_denominator`). Preference metrics have no value here:
        NaN (left out of metrics.jsonl)."""
        nll = nll_from_token_logps(logps.chosen, logps.chosen_len, nll_denominator)
        nan = torch.full((), float("nan"), dtype=nll.dtype, device=nll.device)
        values = {k: nan for k in METRIC_KEYS}
        values |= {"loss": nll.detach(), "nll_loss": nll.detach(), "logps/chosen": logps.chosen.detach().mean()}
        return nll, values
