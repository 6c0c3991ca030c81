"""What a team writes to gate its DPO checkpoints: runs once per checkpoint given with --dpo-checkpoint."""

from pytest_dpo import assert_margin_positive


def test_margin_is_positive(dpo_result):
    assert_margin_positive(dpo_result)


def test_policy_prefers_chosen_on_most_rows(dpo_result):
    wins = (dpo_result.per_example.margins > 0).float().mean().item()
    assert wins >= 0.6, f"chosen beats rejected on only {wins:.0%} of rows"


def test_rejected_logps_below_chosen(dpo_metrics):
    chosen, rejected = dpo_metrics["logps/chosen"], dpo_metrics["logps/rejected"]
    assert rejected < chosen, f"mean rejected log-prob {rejected:.4f} is not below the chosen one {chosen:.4f}"
