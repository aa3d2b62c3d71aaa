import math

import pytest
import torch

from demoalign.losses import implicit_rewards, nll, pairwise_loss, pairwise_margin

# policy_demo, policy_neg, ref_demo, ref_neg = -1, -2, -1.5, -1 and β = 0.5:
# u = 0.5 * ((-1 + 1.5) - (-2 + 1)) = 0.5 * (0.5 + 1) = 0.75
ARGS = (torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.0]), 0.5)


def test_margin_by_hand():
    assert pairwise_margin(*ARGS).item() == pytest.approx(0.75)


@pytest.mark.parametrize(
    "loss_type, expected",
    [
        ("sigmoid", math.log(1 + math.exp(-0.75))),  # 0.386871...
        ("hinge", 0.25),
        ("linear", -0.75),
    ],
)
def test_loss_values_by_hand(loss_type, expected):
    assert pairwise_loss(*ARGS, loss_type=loss_type).item() == pytest.approx(expected, rel=1e-6)


def test_hinge_is_zero_past_the_margin_and_linear_unbounded():
    # u = 1 * ((0 - 0) - (-3 - 0)) = 3
    args = (
        torch.tensor([0.0]),
        torch.tensor([-3.0]),
        torch.tensor([0.0]),
        torch.tensor([0.0]),
        1.0,
    )
    assert pairwise_loss(*args, loss_type="hinge").item() == 0.0
    assert pairwise_loss(*args, loss_type="linear").item() == pytest.approx(-3.0)
    assert pairwise_loss(*args, loss_type="sigmoid").item() == pytest.approx(
        math.log(1 + math.exp(-3))
    )


def test_sigmoid_at_zero_margin_is_log2_per_pair():
    zeros = torch.zeros(3)
    out = pairwise_loss(zeros, zeros, zeros, zeros, 0.1)
    assert out.shape == (3,)
    assert torch.allclose(out, torch.full((3,), math.log(2)))


def test_unknown_loss_type():
    with pytest.raises(ValueError, match="sigmoid"):
        pairwise_loss(*ARGS, loss_type="ipo")


def test_implicit_reward_and_nll():
    assert implicit_rewards(torch.tensor(-2.0), torch.tensor(-3.0), 0.1).item() == pytest.approx(
        0.1
    )
    assert nll(torch.tensor([-4.5])).item() == 4.5


def test_reward_pair_loss_by_hand():
    from demoalign.losses import reward_pair_loss

    margin = torch.tensor([0.0, 2.0, -1.0])
    logistic = reward_pair_loss(margin, "logistic")
    expected = [math.log(2), math.log(1 + math.exp(-2)), math.log(1 + math.exp(1))]
    assert logistic.tolist() == pytest.approx(expected, rel=1e-6)
    assert reward_pair_loss(margin, "linear").tolist() == [-0.0, -2.0, 1.0]
    with pytest.raises(ValueError, match="logistic or linear"):
        reward_pair_loss(margin, "hinge")


def test_rloo_advantages_use_the_leave_one_out_baseline_by_hand():
    from demoalign.losses import rloo_advantages

    shaped = torch.tensor([[1.0, 2.0, 6.0], [0.5, 0.5, 0.5]])
    # Row 1: baselines (2+6)/2 = 4, (1+6)/2 = 3.5, (1+2)/2 = 1.5 -> -3, -1.5, 4.5 (not R - mean).
    assert rloo_advantages(shaped).tolist() == [[-3.0, -1.5, 4.5], [0.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="k >= 2"):
        rloo_advantages(torch.tensor([[1.0]]))
