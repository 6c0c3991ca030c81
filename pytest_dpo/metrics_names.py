"""TRL's DPO eval metric names (without the `eval_` prefix), importable without torch."""

from .spelling import option

METRIC_NAMES = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
    "entropy",
    "mean_token_accuracy",
    "aux_loss",
)

# The first seven are means over examples, so they have confidence intervals (see stats.py); the
# others are token-weighted, or (`aux_loss`) one value over the whole eval set.
PER_EXAMPLE_METRICS = METRIC_NAMES[:7]
# Reported, as TRL logs them, only for a mixture-of-experts policy whose load-balancing loss is enabled.
MOE_METRICS = ("aux_loss",)

# How the confidence interval of a mean is computed; `rewards/accuracies` always gets Wilson's.
INTERVAL_METHODS = ("t", "bootstrap")
DEFAULT_INTERVAL_METHOD = "t"

def non_finite_cause() -> str:
    """Why a metric is NaN or infinite, and what to do: said by every gate and helper that meets one."""
    return (
        "the checkpoint's weights or logits contain NaN/inf. Check its weights (assert_metrics_finite lists the "
        f"rows), or evaluate in float32 ({option('dtype')} float32) if float16 overflowed"
    )


def non_finite_text(value: float) -> str:
    """`NaN`, `inf` or `-inf`."""
    return "NaN" if value != value else str(value)
