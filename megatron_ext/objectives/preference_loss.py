"""Reference-free preference losses on answer log-probabilities from vocab-parallel logits.

For one row with a chosen answer y_w and M rejected answers y_l1..y_lM, s(y) is the mean token
log-probability of the answer given the prompt (length-normalised, as SimPO and LOGO):

  logo      L = -log sigmoid(beta * (s(y_w) - mean_j s(y_lj)) - gamma) + sft_weight * CE(y_w)
  simpo     the same with M = 1 (and no SFT term by default)
  orpo      L = sft_weight * CE(y_w) + beta * mean_j -log sigmoid(log odds(y_w) - log odds(y_lj)),
            odds(y) = P / (1 - P) with P = exp(s(y)) (ORPO, Hong et al. 2024; the odds use the
            length-normalised log-probs, as TRL's ORPOTrainer; beta is ORPO's lambda, default
            0.1; the NLL term has weight 1)
  sft-only  L = sft_weight * CE(y_w): the chosen answers' NLL, the baseline preference papers
            report (rejected answers are read but not trained on)

With a reference model's log-probs computed offline (``reference_logps.py``; r(y) below, pi(y) the
policy's; both the SUM of an answer's token log-probs), as TRL's DPOTrainer defines them:

  dpo       h = beta * ((pi(y_w) - r(y_w)) - mean_j (pi(y_lj) - r(y_lj)))
            L = -(1 - eps) log sigmoid(h) - eps log sigmoid(-h)   (eps: --dpo-label-smoothing)
  ipo       h as dpo without beta, on length-normalised log-probs (TRL's IPO); L = (h - 1/(2 beta))^2

CE(y_w) is the chosen answer's token-mean cross entropy, i.e. -s(y_w): both use correctly shifted
labels (the logit at t - 1 scores token t) and only answer tokens. All M rejected answers weigh
the same (the released LOGO code over-weighted the first). The
loss of a global batch is the mean over its rows; with a per-device batch of 1 and gradient
accumulation, as LOGO trained, that is also what the released code averaged.

Distributed: the token log-probs come from Megatron's ``vocab_parallel_cross_entropy`` (each TP
rank holds V / TP logits; no rank gathers the vocabulary). Under context parallelism an answer's
tokens are spread over the CP ranks, so the per-answer sums are added over the CP group
(``sum_over_group``) before the non-linear loss; every CP rank then holds the same per-row losses.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from megatron_ext.parallel.collectives import sum_over_group
from megatron_ext.errors import UserError

METRICS = ("pref_loss", "sft_loss", "rewards/chosen", "rewards/rejected", "margin", "accuracy")


@dataclasses.dataclass(frozen=True)
class PreferenceLossConfig:
    loss: str
    beta: float
    gamma: float
    sft_weight: float
    num_rejected: int
    label_smoothing: float = 0.0

    @classmethod
    def from_options(cls, options) -> "PreferenceLossConfig":
        """From the run's ``PreferenceOptions`` (``cfg.objective.options``)."""
        return cls(options.preference_loss, options.beta, options.gamma, options.sft_weight,
                   options.num_rejected, options.dpo_label_smoothing)


def answer_log_prob_sums(token_log_probs: torch.Tensor, rows: torch.Tensor, branches: torch.Tensor,
                         batch_size: int, num_branches: int, cp_group=None) -> torch.Tensor:
    """[batch, 1 + M] sums of the scored tokens' log-probs per row and answer (over all CP ranks).

    token_log_probs [n]: log-prob of the label at each scored position this rank holds; rows [n]
    and branches [n]: which row and which answer (0 = chosen) each belongs to.
    """
    slot = rows * num_branches + branches
    sums = token_log_probs.new_zeros(batch_size * num_branches).index_add(0, slot, token_log_probs)
    return sum_over_group(sums, cp_group).view(batch_size, num_branches)


REFERENCE_LOSSES = ("dpo", "ipo")


def preference_losses(mean_log_probs: torch.Tensor, config: PreferenceLossConfig,
                      sums: Optional[torch.Tensor] = None,
                      reference: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
                      ) -> Dict[str, torch.Tensor]:
    """Per-row losses and metrics from ``mean_log_probs`` [batch, 1 + M] (s of each answer);
    dpo / ipo also take the policy's ``sums`` and the reference's (sums, means) of the rows."""
    chosen, rejected = mean_log_probs[:, 0], mean_log_probs[:, 1:].mean(dim=1)
    sft = -chosen
    if config.loss in REFERENCE_LOSSES:
        return _reference_losses(config, sft, sums, mean_log_probs, reference)
    if config.loss in ("logo", "simpo"):
        pref = -F.logsigmoid(config.beta * (chosen - rejected) - config.gamma)
    elif config.loss == "orpo":
        # log odds(y) = s - log(1 - exp(s)); log1p(-exp) is exact for s < 0 (a mean log-prob).
        def log_odds(s):
            return s - torch.log1p(-torch.exp(s))

        ratios = log_odds(chosen).unsqueeze(1) - log_odds(mean_log_probs[:, 1:])
        pref = config.beta * -F.logsigmoid(ratios).mean(dim=1)
    elif config.loss == "sft-only":
        pref = torch.zeros_like(chosen)
    else:
        raise UserError(f"--preference-loss {config.loss!r}: expected one of "
                        "logo, simpo, orpo, sft-only, dpo, ipo")
    with torch.no_grad():
        rewards_chosen, rewards_rejected = config.beta * chosen, config.beta * rejected
        metrics = {"rewards/chosen": rewards_chosen, "rewards/rejected": rewards_rejected,
                   "margin": rewards_chosen - rewards_rejected,
                   "accuracy": (chosen > rejected).to(chosen.dtype)}
    return {"loss": pref + config.sft_weight * sft, "pref_loss": pref, "sft_loss": sft, **metrics}


def _reference_losses(config: PreferenceLossConfig, sft: torch.Tensor, sums: torch.Tensor,
                      means: torch.Tensor, reference) -> Dict[str, torch.Tensor]:
    """DPO / IPO against offline reference log-probs (see the module docstring)."""
    if sums is None or reference is None:
        raise UserError(f"--preference-loss {config.loss} needs --reference-logps")
    reference_sums, reference_means = reference
    if config.loss == "dpo":
        ratios = sums - reference_sums  # log pi/ref of each answer
        rewards = config.beta * ratios
        h = config.beta * (ratios[:, 0] - ratios[:, 1:].mean(dim=1))
        eps = config.label_smoothing
        pref = -(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)
    else:  # ipo
        ratios = means - reference_means
        rewards = config.beta * ratios
        h = ratios[:, 0] - ratios[:, 1:].mean(dim=1)
        pref = (h - 1 / (2 * config.beta)) ** 2
    with torch.no_grad():
        chosen_rewards, rejected_rewards = rewards[:, 0], rewards[:, 1:].mean(dim=1)
        metrics = {"rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
                   "margin": chosen_rewards - rejected_rewards,
                   "accuracy": (chosen_rewards > rejected_rewards).to(sft.dtype)}
    return {"loss": pref + config.sft_weight * sft, "pref_loss": pref, "sft_loss": sft, **metrics}
