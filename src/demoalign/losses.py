"""Losses as pure tensor functions (docs/algorithms.md §2, §3). Each returns PER-EXAMPLE values;
the training
loop decides how they are summed and normalised across micro-batches and processes."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import LOSS_TYPES


def pairwise_margin(
    policy_demo: torch.Tensor,
    policy_neg: torch.Tensor,
    ref_demo: torch.Tensor,
    ref_neg: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """u = β[(log π(y) − log π_ref(y)) − (log π(ỹ) − log π_ref(ỹ))], one value per pair."""
    return beta * ((policy_demo - ref_demo) - (policy_neg - ref_neg))


def pairwise_loss(
    policy_demo: torch.Tensor,
    policy_neg: torch.Tensor,
    ref_demo: torch.Tensor,
    ref_neg: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
) -> torch.Tensor:
    """Per-pair IRFT/SPIN loss: sigmoid −log σ(u), hinge max(0, 1 − u), linear −u."""
    u = pairwise_margin(policy_demo, policy_neg, ref_demo, ref_neg, beta)
    if loss_type == "sigmoid":
        return -F.logsigmoid(u)
    if loss_type == "hinge":
        return torch.relu(1.0 - u)
    if loss_type == "linear":
        return -u
    raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")


def implicit_rewards(policy: torch.Tensor, ref: torch.Tensor, beta: float) -> torch.Tensor:
    """r(x, y) = β (log π(y|x) − log π_ref(y|x))."""
    return beta * (policy - ref)


def nll(token_logps_sum: torch.Tensor) -> torch.Tensor:
    """SFT loss per example: the negative summed log-prob of its response tokens."""
    return -token_logps_sum


def reward_pair_loss(margin: torch.Tensor, loss_type: str) -> torch.Tensor:
    """RFT's reward-model loss per pair, margin = r(y) − r(ỹ): logistic −log σ(margin)
    (Bradley–Terry) or linear −margin (the gradient the paper's derivation gives)."""
    if loss_type == "logistic":
        return -F.logsigmoid(margin)
    if loss_type == "linear":
        return -margin
    raise ValueError(f"reward loss {loss_type!r}: choose logistic or linear")


def rloo_advantages(shaped: torch.Tensor) -> torch.Tensor:
    """Leave-one-out advantages of k ≥ 2 samples per row (prompt): A_i = R_i − mean_{j≠i} R_j."""
    k = shaped.shape[-1]
    if k < 2:
        raise ValueError("the leave-one-out baseline needs k >= 2 samples per prompt")
    baseline = (shaped.sum(-1, keepdim=True) - shaped) / (k - 1)
    return shaped - baseline
