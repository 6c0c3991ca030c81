"""Where the bundled fixture artefacts live (built by fixtures/build.py)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
DATA = FIXTURES / "data"
BASE = FIXTURES / "base"
FULL_RUN = FIXTURES / "runs" / "dpo-full"
LORA_RUN = FIXTURES / "runs" / "dpo-lora"
PROMPT_TUNING_RUN = FIXTURES / "runs" / "dpo-prompt-tuning"
MOE_BASE = FIXTURES / "base-moe"
MOE_RUN = FIXTURES / "runs" / "dpo-moe"
EVAL_STANDARD = DATA / "eval_standard.jsonl"
EVAL_CONVERSATIONAL = DATA / "eval_conversational.jsonl"
EVAL_IMPLICIT = DATA / "eval_implicit.jsonl"
EVAL_IMPLICIT_CONVERSATIONAL = DATA / "eval_implicit_conversational.jsonl"
