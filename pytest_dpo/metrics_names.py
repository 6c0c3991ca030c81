"""TRL's DPO eval metric names (without the `eval_` prefix), importable without torch."""

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
)

# The first seven are means over examples, so they have confidence intervals (see stats.py); the
# others are token-weighted.
PER_EXAMPLE_METRICS = METRIC_NAMES[:7]
