"""TRL 1.16's own numbers for a checkpoint, for the parity tests (test-only: imports trl).

`trl_evaluate` runs `DPOTrainer.evaluate()` with the whole eval set as one
eval batch (the setting in which TRL's per-batch averaging equals our
whole-set averaging) and also returns TRL's per-example log-probs and its
tokenized eval set, taken from the trainer's own data path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


@dataclass
class TrlReference:
    metrics: dict[str, float]
    policy_chosen_logps: torch.Tensor
    policy_rejected_logps: torch.Tensor
    reference_chosen_logps: torch.Tensor
    reference_rejected_logps: torch.Tensor
    prompt_ids: list[list[int]]
    chosen_ids: list[list[int]]
    rejected_ids: list[list[int]]
    kept_rows: list[int]


def _causal_lm(path: str | Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


def trl_evaluate(
    policy: str | Path,
    reference: str | Path,
    rows: list[dict[str, Any]],
    output_dir: Path,
    *,
    adapter_base: str | Path | None = None,
    reference_is_adapter: bool = False,
    tokenizer_path: str | Path | None = None,
    **dpo_settings: Any,
) -> TrlReference:
    """TRL's metrics and per-example log-probs for `policy` against `reference` on `rows`.

    `policy` is a model folder, or an adapter folder on `adapter_base`. The
    reference is always passed explicitly, as the parity tests require: a
    model folder, or (`reference_is_adapter`) an adapter folder on
    `adapter_base`, merged into its base because TRL's fused LM head patches
    plain causal LMs only.
    """
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    if adapter_base is None:
        model = _causal_lm(policy)
    else:
        model = PeftModel.from_pretrained(_causal_lm(adapter_base), str(policy))
    if reference_is_adapter:
        ref_model = PeftModel.from_pretrained(_causal_lm(adapter_base), str(reference)).merge_and_unload()
    else:
        ref_model = _causal_lm(reference)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path or policy))
    # The index column travels through TRL's data path and tells which rows it kept.
    dataset = Dataset.from_list([{**row, "row_index": index} for index, row in enumerate(rows)])
    config = DPOConfig(
        output_dir=str(output_dir),
        per_device_eval_batch_size=len(rows),
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        **{"bf16": False, "fp16": False, **dpo_settings},
    )
    trainer = DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=config,
        train_dataset=dataset,
        eval_dataset=dataset,
        processing_class=tokenizer,
    )
    metrics = {key.removeprefix("eval_"): value for key, value in trainer.evaluate().items()}
    prepared = trainer.eval_dataset
    batch = trainer.data_collator([prepared[i] for i in range(len(prepared))])
    trainer.model.eval()
    policy_chosen, policy_rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    reference_chosen, reference_rejected = trainer.compute_ref_log_probs(trainer.ref_model, batch)
    return TrlReference(
        metrics=metrics,
        policy_chosen_logps=policy_chosen.cpu(),
        policy_rejected_logps=policy_rejected.cpu(),
        reference_chosen_logps=reference_chosen.cpu(),
        reference_rejected_logps=reference_rejected.cpu(),
        prompt_ids=list(prepared["prompt_ids"]),
        chosen_ids=list(prepared["chosen_ids"]),
        rejected_ids=list(prepared["rejected_ids"]),
        kept_rows=list(prepared["row_index"]),
    )
