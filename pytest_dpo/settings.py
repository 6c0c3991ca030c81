"""The evaluation settings: one dataclass, TRL's `DPOConfig` names and defaults.

Every field declares its help text, text parser, flag-ness and default, so the
pytest options, the ini keys and the command line are generated from the same
source and can never disagree.
Importing this module is cheap: no torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import Field, asdict, dataclass, field, fields
from typing import Any

PER_EXAMPLE_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
    "sft",
)
# TRL sorts these over the batch, so a row's loss depends on the other rows of its batch.
BATCH_DEPENDENT_LOSS_TYPES = ("aot", "aot_unpaired")
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# TRL's f-DPO reparameterization leaves a beta * log Z(x) term that cancels only in the chosen-rejected reward
# difference, so TRL refuses a non-default f-divergence with the other loss types.
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
TRUNCATION_MODES = ("keep_start", "keep_end")
# Weights loaded in float32, bfloat16 or float16; or float32 weights run under torch.autocast, as TRL's
# DPOConfig(bf16=True) (its default) and DPOConfig(fp16=True) evaluate them.
AUTOCAST_PREFIX = "autocast-"
DTYPES = ("float32", "bfloat16", "float16", "autocast-bfloat16", "autocast-float16")
# accelerate's automatic placements (`from_pretrained(device_map=...)`).
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


class SettingsError(ValueError):
    """A setting has a value that cannot be used; the message names the setting and the fix.

    `field` is the name of the setting at fault, so a front end can name its
    own spelling of it (`--dpo-beta`, `dpo_beta`).
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _optional_int(text: str) -> int | None:
    return None if text.strip().lower() in ("none", "null", "") else int(text)


def _optional_float(text: str) -> float | None:
    return None if text.strip().lower() in ("none", "null", "") else float(text)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(part) for part in text.split(","))


def _optional_str(text: str) -> str | None:
    return None if text.strip().lower() in ("", "auto", "none") else text.strip()


def _device_map(text: str) -> str | None:
    return None if text.strip().lower() in ("", "none") else text.strip()


def _flag(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off", ""):
        return False
    raise ValueError(text)


_EXPECTED = {
    float: "a number, e.g. 0.1",
    int: "a whole number, e.g. 8",
    _optional_int: "a whole number, or none",
    _optional_float: "a number, or none",
    _floats: "comma-separated numbers, e.g. 1.0,0.5",
    _flag: "true or false",
}


def value_text(value: object) -> str:
    """A value as it is typed (`none`, `true`, `sigmoid,ipo`): the text a setting's parser reads back as `value`."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(value_text(part) for part in value)
    return str(value)


def help_with_default(help: str, default_text: str | None, is_flag: bool = False) -> str:
    """`help` showing its default: in place of `{default}` where the help names it, else as a closing
    `(default: …)`; none for an on/off flag (off unless given) or an option without a default."""
    if "{default}" in help:
        return help.replace("{default}", default_text or "")
    if is_flag or default_text is None:
        return help
    return f"{help} (default: {default_text})"


def setting(
    default: Any, parse: Callable[[str], Any], help: str, *, flag: bool = False, default_text: str | None = None
) -> Any:
    """Declare a `DPOSettings` field: its default, how text is read (`parse`, `ValueError` when it cannot), its help,
    whether it is an on/off `flag`, and its default in words where it is chosen at run time."""
    metadata: dict[str, Any] = {"help": help, "parse": parse}
    if flag:
        metadata["flag"] = True
    if default_text is not None:
        metadata["default_text"] = default_text
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class DPOSettings:
    """Everything that changes the numbers of a DPO evaluation, and how its checkpoints may be loaded.

    Names and defaults follow TRL 1.16's `DPOConfig`, so a team copies its
    training settings over unchanged. The loading flags (`allow_pickle`,
    `trust_remote_code`) are off by default and relax safety only when asked.

    Each field declares everything a face needs in its metadata: `help`, `parse`
    (text → value, `ValueError` when it cannot), `flag` (an on/off switch: a flag
    on the command line, a bool ini key) and `default_text` (the default in
    words, where it is chosen at run time). A help names its default as
    `{default}`, or is followed by it. `SETTINGS` reads them.
    """

    beta: float = setting(0.1, float, "DPO beta: rewards are beta * (policy - reference) completion log-probs.")
    loss_type: tuple[str, ...] = setting(
        ("sigmoid",),
        str,
        "TRL loss type(s) for `loss`, e.g. sigmoid, ipo, hinge; several combine with loss_weights.",
    )
    loss_weights: tuple[float, ...] | None = setting(
        None,
        _floats,
        "Weights of the loss types when several are combined.",
        default_text="1.0 each",
    )
    label_smoothing: float = setting(0.0, float, "Label smoothing for the robust and exo_pair losses, in [0, 0.5).")
    discopop_tau: float = setting(0.05, float, "Temperature of the discopop loss.")
    ld_alpha: float | None = setting(
        None,
        _optional_float,
        "Alpha of the LD-DPO paper, the weight of the verbose token log-probabilities (beyond the shorter "
        "completion's length), in [0, 1]: 1.0 applies no weighting, 0.0 masks the tokens beyond the shared "
        "length; None: standard DPO.",
    )
    f_divergence_type: str = setting(
        "reverse_kl",
        str,
        "f-divergence regularizer between policy and reference (f-DPO paper): {default} (default), "
        "forward_kl, js_divergence, alpha_divergence. Only the loss types built on the chosen-rejected reward "
        "difference support a non-default value: sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop, "
        "sft.",
    )
    f_alpha_divergence_coef: float = setting(
        0.5,
        float,
        "Alpha coefficient of the alpha-divergence u^-alpha regularizer, used only when f_divergence_type "
        "is alpha_divergence.",
    )
    use_weighting: bool = setting(
        False,
        _flag,
        "WPO-style weighting of the preference pairs by the policy's length-normalized sequence "
        "probabilities.",
    )
    router_aux_loss_coef: float | None = setting(
        None,
        _optional_float,
        "Weight of a mixture-of-experts policy's load-balancing loss (aux_loss), added to loss; None: "
        "the coefficient the model config declares; 0.0 leaves it out. Only for models that return router logits.",
    )
    max_length: int | None = setting(
        1024,
        _optional_int,
        "Maximum tokens of prompt + completion; longer sequences are truncated (None: no limit).",
    )
    truncation_mode: str = setting("keep_start", str, "{default} (TRL default) or keep_end.")
    batch_size: int = setting(
        8,
        int,
        "Preference rows per forward pass (each row is scored as a chosen and a rejected sequence).",
    )
    device: str | None = setting(
        None,
        _optional_str,
        "torch device for the models.",
        default_text="cuda if available, else cpu",
    )
    dtype: str | None = setting(
        None,
        _optional_str,
        "float32, bfloat16 or float16: the weights loaded in that dtype; autocast-bfloat16 or "
        "autocast-float16: float32 weights run under torch.autocast, as TRL's DPOConfig(bf16=True) (its default) "
        "or DPOConfig(fp16=True) evaluates a float32 model.",
        default_text="bfloat16 on CUDA devices that support it, else float32",
    )
    device_map: str | None = setting(
        None,
        _device_map,
        "auto (or balanced, balanced_low_0, sequential): shard each model over all visible GPUs with "
        "accelerate's big-model loading, for models larger than one GPU; needs accelerate.",
        default_text="the whole model on the chosen device",
    )
    share_prompt: bool = setting(
        True,
        _flag,
        "run each row's prompt once, with both completions packed after it in one sequence or continuing "
        "from its KV cache (true); false runs prompt + completion twice, as TRL does. Same numbers up to "
        "float rounding.",
    )
    allow_pickle: bool = setting(
        False,
        _flag,
        "also load weights stored only as pickle (pytorch_model.bin, adapter_model.bin), which can run "
        "arbitrary code when loaded; accept that risk only for checkpoints you trust (TRL's training_args.bin is "
        "never loaded).",
        flag=True,
    )
    trust_remote_code: bool = setting(
        False,
        _flag,
        "run the Python code a checkpoint, reference or tokenizer ships (auto_map in config.json or "
        "tokenizer_config.json); only for repos you trust.",
        flag=True,
    )

    def __post_init__(self) -> None:
        if isinstance(self.loss_type, str):
            object.__setattr__(self, "loss_type", tuple(part.strip() for part in self.loss_type.split(",")))
        else:
            object.__setattr__(self, "loss_type", tuple(self.loss_type))
        if self.loss_weights is not None:
            object.__setattr__(self, "loss_weights", tuple(float(w) for w in self.loss_weights))
        self._validate()

    def _validate(self) -> None:
        if not 0 < self.beta < math.inf:
            rule = "finite" if self.beta == math.inf else "> 0"
            raise SettingsError("beta", f"beta must be {rule}, got {self.beta}. Use the beta the checkpoint was trained with.")
        if not self.loss_type:
            raise SettingsError("loss_type", "loss_type is empty. Give at least one loss type, e.g. 'sigmoid'.")
        for loss_type in self.loss_type:
            if loss_type in BATCH_DEPENDENT_LOSS_TYPES:
                raise SettingsError(
                    "loss_type",
                    f"loss_type '{loss_type}' is not supported: TRL sorts it across the rows of a batch, so a row's "
                    "loss depends on which rows share its batch and has no per-example value. "
                    "Evaluate with 'sigmoid' (or another per-example loss) instead."
                )
            if loss_type not in PER_EXAMPLE_LOSS_TYPES:
                raise SettingsError(
                    "loss_type",
                    f"Unknown loss_type '{loss_type}'. Choose from: {', '.join(PER_EXAMPLE_LOSS_TYPES)}."
                )
        if self.loss_weights is not None and not all(math.isfinite(weight) for weight in self.loss_weights):
            raise SettingsError(
                "loss_weights", f"loss_weights must be finite numbers, got {', '.join(map(str, self.loss_weights))}."
            )
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise SettingsError(
                "loss_weights",
                f"loss_weights has {len(self.loss_weights)} values for {len(self.loss_type)} loss types "
                f"({', '.join(self.loss_type)}). Give one weight per loss type."
            )
        if not 0.0 <= self.label_smoothing < 0.5:
            raise SettingsError(
                "label_smoothing",
                f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}. Use the value the checkpoint was "
                "trained with (TRL's default is 0.0).",
            )
        if "exo_pair" in self.loss_type and self.label_smoothing == 0.0:
            raise SettingsError(
                "label_smoothing",
                "loss_type 'exo_pair' needs label_smoothing > 0 (TRL refuses 0; the EXO paper recommends 1e-3)."
            )
        if not 0 < self.discopop_tau < math.inf:
            rule = "finite" if self.discopop_tau == math.inf else "> 0"
            raise SettingsError("discopop_tau", f"discopop_tau must be {rule}, got {self.discopop_tau}. TRL's default is 0.05.")
        self._validate_loss_variants()
        if self.router_aux_loss_coef is not None and not math.isfinite(self.router_aux_loss_coef):
            raise SettingsError(
                "router_aux_loss_coef",
                f"router_aux_loss_coef must be a finite number (or None for the model config's), got "
                f"{self.router_aux_loss_coef}.",
            )
        if self.max_length is not None and self.max_length < 2:
            raise SettingsError("max_length", f"max_length must be at least 2 tokens (or None), got {self.max_length}.")
        if self.truncation_mode not in TRUNCATION_MODES:
            raise SettingsError(
                "truncation_mode",
                f"Unknown truncation_mode '{self.truncation_mode}'. Choose from: {', '.join(TRUNCATION_MODES)}."
            )
        if self.batch_size < 1:
            raise SettingsError("batch_size", f"batch_size must be at least 1, got {self.batch_size}.")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise SettingsError("dtype", f"Unknown dtype '{self.dtype}'. Choose from: {', '.join(DTYPES)}.")
        if self.device_map is not None and self.device_map not in DEVICE_MAPS:
            raise SettingsError(
                "device_map",
                f"Unknown device_map '{self.device_map}'. Choose from: {', '.join(DEVICE_MAPS)} (or leave it unset "
                "to load each model whole on one device).",
            )

    def _validate_loss_variants(self) -> None:
        """ld_alpha, the f-divergence and WPO weighting: refused outside the range TRL 1.16 documents, and in the
        combinations it refuses or fails on."""
        if self.ld_alpha is not None and not 0.0 <= self.ld_alpha <= 1.0:
            raise SettingsError(
                "ld_alpha",
                f"ld_alpha must be in [0, 1] (or None for plain DPO), got {self.ld_alpha}. Use the value the "
                "checkpoint was trained with.",
            )
        if self.f_divergence_type not in F_DIVERGENCE_TYPES:
            raise SettingsError(
                "f_divergence_type",
                f"Unknown f_divergence_type '{self.f_divergence_type}'. Choose from: {', '.join(F_DIVERGENCE_TYPES)}.",
            )
        unsupported = [loss_type for loss_type in self.loss_type if loss_type not in F_DIVERGENCE_LOSS_TYPES]
        if self.f_divergence_type != "reverse_kl" and unsupported:
            raise SettingsError(
                "f_divergence_type",
                f"f_divergence_type '{self.f_divergence_type}' does not apply to loss_type {', '.join(unsupported)} "
                f"(TRL refuses it too): use it with {', '.join(F_DIVERGENCE_LOSS_TYPES)}, or keep reverse_kl.",
            )
        if not math.isfinite(self.f_alpha_divergence_coef):
            raise SettingsError(
                "f_alpha_divergence_coef",
                f"f_alpha_divergence_coef must be a finite number, got {self.f_alpha_divergence_coef}. TRL's default "
                "is 0.5.",
            )
        if self.use_weighting and "sft" in self.loss_type:
            raise SettingsError(
                "use_weighting",
                "use_weighting cannot weigh loss_type 'sft': its loss is one token mean per batch, not one value per "
                "pair (TRL 1.16 fails on this combination). Drop sft from loss_type, or use_weighting.",
            )

    @property
    def weights(self) -> tuple[float, ...]:
        """The loss weights, 1.0 for each loss type unless given."""
        return self.loss_weights if self.loss_weights is not None else (1.0,) * len(self.loss_type)

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-serialisable values (tuples become lists)."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def from_text(cls, values: dict[str, str]) -> DPOSettings:
        """Settings from text values (command line, ini file), keyed by field name; absent fields keep defaults.

        Raises:
            SettingsError: a value cannot be read or is out of range; `.field` names it.
        """
        parsed: dict[str, Any] = {}
        for name, text in values.items():
            parse = SETTINGS_BY_NAME[name].parse
            try:
                parsed[name] = parse(text)
            except ValueError:
                expected = _EXPECTED.get(parse, "a value")
                raise SettingsError(name, f"cannot read {text!r} as a value for {name}: give {expected}.") from None
        return cls(**parsed)


@dataclass(frozen=True)
class Setting:
    """One `DPOSettings` field as the faces (pytest options, ini keys, the command line) declare it.

    Attributes:
        name (`str`): the field name, e.g. `max_length`.
        help (`str`): what the setting does; `{default}` where it names its default (`help_with_default`).
        default (`Any`): the field's default value.
        parse (`Callable[[str], Any]`): text → value; raises `ValueError` on text it cannot read.
        is_flag (`bool`): an on/off switch, given without a value on the command line.
        default_text (`str`): the default as the user reads it: typed (`0.1`, `none`, `sigmoid`), or in words
            where it is chosen at run time (`cuda if available, else cpu`); `off` for a flag.
    """

    name: str
    help: str
    default: Any
    parse: Callable[[str], Any]
    is_flag: bool
    default_text: str

    @classmethod
    def of(cls, declared: Field[Any]) -> Setting:
        is_flag = declared.metadata.get("flag", False)
        default_text = declared.metadata.get("default_text") or ("off" if is_flag else value_text(declared.default))
        return cls(declared.name, declared.metadata["help"], declared.default, declared.metadata["parse"], is_flag, default_text)

    @property
    def help_with_default(self) -> str:
        return help_with_default(self.help, self.default_text, self.is_flag)


SETTINGS: tuple[Setting, ...] = tuple(Setting.of(declared) for declared in fields(DPOSettings))
SETTINGS_BY_NAME = {setting.name: setting for setting in SETTINGS}
