"""RFT warns once, at its start, when its rollouts are not samples of the policy itself
(temperature != 1 or top_p < 1): RLOO's gradient and KL estimate then are biased."""

from __future__ import annotations

import pytest

from conftest import small_rft_values
from demoalign import RFTConfig, train
from demoalign.config import build_config
from demoalign.methods.rft import off_policy_warning


def rft_config(tiny_model_dir, out, **overrides) -> RFTConfig:
    return build_config(RFTConfig, small_rft_values(tiny_model_dir, out, **overrides))


@pytest.mark.parametrize(
    ("temperature", "top_p", "biased"),
    [(1.0, 1.0, False), (0.7, 1.0, True), (1.0, 0.9, True), (1.3, 1.0, True)],
)
def test_only_sampling_from_the_policy_itself_is_unbiased(
    tiny_model_dir, tmp_path, temperature, top_p, biased
):
    config = rft_config(tiny_model_dir, tmp_path, temperature=temperature, top_p=top_p)
    warning = off_policy_warning(config)
    assert (warning is not None) == biased
    if biased:
        assert f"temperature={temperature}" in warning and f"top_p={top_p}" in warning
        assert "biased" in warning and "\n" not in warning


def test_a_tempered_rft_run_warns_once_at_its_start(tiny_model_dir, tmp_path, capsys, one_thread):
    steps = dict(outer_iterations=1, reward_steps=1, policy_steps=1, max_examples=4)
    train(rft_config(tiny_model_dir, tmp_path / "run", temperature=0.7, **steps))
    lines = [line for line in capsys.readouterr().err.splitlines() if "RLOO" in line]
    assert lines == [off_policy_warning(rft_config(tiny_model_dir, tmp_path, temperature=0.7))]
