"""Hyperparameters of the CODE editor and its baselines: one dataclass tree loaded from TOML.

Presets live in code_edit/hparams/*.toml (docs/method.md 3.1 / 8.2 values); `load_hparams` takes a preset
name or any TOML path. Every value must be given (by the file or by the preset it `extends`).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HPARAMS_DIR = Path(__file__).resolve().parent / "hparams"
MAX_EXTENDS_DEPTH = 8


class HparamsError(ValueError):
    """A preset or hparams file is missing, malformed, or has an unknown / ill-typed key."""


@dataclass(frozen=True)
class ModelSettings:
    source: str  # hub id, local dir, .gguf path or embedded name; resolved by model.load_model
    dtype: str  # "bfloat16" | "float16" | "float32" | "auto" (the loader's default: bf16 on CUDA, fp32 on CPU)
    max_seq_len: int  # prompt + completion cap for every generation (reference: max_model_len 1536)
    grad_checkpointing: bool | str  # recompute layer activations in backward (SFT and distillation): memory for
    # time; "auto": only where a step's activations would not fit the GPU (train/memory.py)


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]
    init_seed: int  # torch seed used to initialise the fresh adapter of each case


@dataclass(frozen=True)
class OptimizerSettings:
    # The reference used bitsandbytes paged_adamw_8bit; we use torch AdamW with these (HF default) values.
    adam_beta1: float
    adam_beta2: float
    adam_eps: float
    weight_decay: float


@dataclass(frozen=True)
class BootstrapSettings:
    """Stage 1 (reference "stage2"): best-of-N teacher thoughts, then SFT."""

    replica_times: int  # independent best-of-N selections -> SFT examples per edit
    num_samples: int  # candidates per replica
    max_new_tokens: int
    temperature: float
    top_p: float
    max_resample_rounds: int  # extra sampling rounds for a replica with no valid candidate, then skip
    min_thought_words: int
    noncausal_max_rounds: int  # sampling rounds in noncausal mode before padding
    epochs: int  # upper bound; early stop usually ends SFT first
    learning_rate: float
    batch_size: int
    grad_accum: int
    lr_scheduler: str  # "cosine"
    warmup_ratio: float
    max_grad_norm: float
    early_stop_loss: float
    early_stop_consecutive: int
    sft_max_length: int  # prompt + completion tokens per SFT example (longer ones are truncated)
    seed: int  # data order of the SFT loop


@dataclass(frozen=True)
class InternalizeSettings:
    """Stage 2 (reference "stage3"): on-policy distillation from the open-book teacher."""

    max_steps: int  # 0 = max_steps_base + max_steps_per_extra_edit * (edits - 1)
    max_steps_base: int
    max_steps_per_extra_edit: int
    cake_data: bool  # add rows for the CaKE rephrase / learning questions of each rewrite
    data_replica_times: int
    learning_rate: float
    lr_scheduler: str  # "constant_with_warmup"
    warmup_ratio: float  # warmup steps = max(1, round(warmup_ratio * max_steps))
    max_grad_norm: float
    # Reference (TRL GRPO semantics): per_device_train_batch_size 18 completions x 2 accumulation
    # steps = 36 completions per optimizer step = 4 distinct prompts x 9 rollouts; we store those
    # two numbers and the micro-batch count (each micro-batch holds whole prompt groups).
    prompts_per_step: int
    rollouts_per_prompt: int
    micro_batches: int
    temperature: float
    top_p: float
    top_k: int  # rollout top-k sampling; 0 = off
    repetition_penalty: float
    max_completion_length: int
    max_prompt_length: int  # student prompt tokens kept (left-truncated)
    mask_truncated_completions: bool
    direction: str  # "forward" = KL(teacher || student); "reverse" = KL(student || teacher)
    kd_temperature: float
    top_k_support: int  # union of each model's top-k per position; 0 = full vocabulary
    seq_weight_temperature: float  # softmax temperature of the per-group teacher sequence weights
    repetition_ngram_n: int
    repetition_window: int
    repetition_threshold: float
    # The open-book teacher (defaults: the paper's). teacher_form "system_sheet": the cheat-sheet system
    # turn of docs/method.md 2.3; "in_context": no system turn, the article(s) before the user turn, as the
    # InContext method reads them. teacher_articles "own": the rewrite's article; "case": every article of
    # the rewrite's case that is edited in the same unit. teacher_answer_line: the teacher (never the
    # student) is told to end with "The answer now is {new answer}."
    teacher_form: str
    teacher_articles: str
    teacher_answer_line: bool


@dataclass(frozen=True)
class EvalSettings:
    temperature: float  # 0 = greedy
    max_new_tokens: int
    repetition_penalty: float


@dataclass(frozen=True)
class LoraBaselineSettings:
    """Static fact overwriting baseline (reference hparams/LoRA, docs/method.md 8.2)."""

    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]
    epochs: int  # passes over the edit's (question, answer) pairs (the reference's num_steps)
    batch_size: int
    learning_rate: float
    weight_decay: float
    max_length: int


@dataclass(frozen=True)
class CakeBaselineSettings:
    """CaKE augmentation SFT baseline (reference edit_utils.cake, docs/method.md 8.2)."""

    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]
    epochs: int
    batch_size: int
    learning_rate: float
    max_length: int


@dataclass(frozen=True)
class CausalEditConfig:
    editing_mode: str  # "causal" | "noncausal"
    student_use_sft: bool  # student starts from the stage-1 SFT adapter
    teacher_use_sft: bool  # False: teacher = base weights (adapter disabled)
    model: ModelSettings
    lora: LoraSettings
    optimizer: OptimizerSettings
    bootstrap: BootstrapSettings
    internalize: InternalizeSettings
    eval: EvalSettings
    baseline_lora: LoraBaselineSettings
    baseline_cake: CakeBaselineSettings
    name: str = field(default="", compare=False)  # preset name / file stem, set by the loader

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_CHOICES = {
    "editing_mode": ("causal", "noncausal"),
    "model.dtype": ("bfloat16", "float16", "float32", "auto"),
    "model.grad_checkpointing": ("auto",),
    "bootstrap.lr_scheduler": ("cosine", "linear", "constant", "constant_with_warmup"),
    "internalize.lr_scheduler": ("cosine", "linear", "constant", "constant_with_warmup"),
    "internalize.direction": ("forward", "reverse"),
    "internalize.teacher_form": ("system_sheet", "in_context"),
    "internalize.teacher_articles": ("own", "case"),
}
# Keys that may be 0; every other int must be >= 1 (seeds are free).
_ZERO_OK = {
    "internalize.max_steps", "internalize.top_k", "internalize.top_k_support",
    "bootstrap.max_resample_rounds", "internalize.max_steps_per_extra_edit",
}
_FREE_INTS = {"lora.init_seed", "bootstrap.seed"}
# Keys that no longer exist, and why; a file that still sets one gets this in its error.
RENAMED = {"baseline_lora.num_steps": "baseline_lora.epochs"}
REMOVED = {
    "internalize.importance_sampling": "removed: rollouts are sampled by the trained network itself, so the "
                                       "sampler/trainer importance ratio the reference corrects for is 1 "
                                       "(docs/method.md 3.6)",
    "internalize.importance_sampling_cap": "removed with internalize.importance_sampling",
    "internalize.disable_dropout": "removed: distillation always trains with LoRA dropout off (docs/method.md 3.5)",
    "internalize.seed": "removed: each distillation step's seed derives from the unit (case or group) key",
    **{old: f"renamed to {new}" for old, new in RENAMED.items()},
}
ADDED = {  # keys added since runs were first stored, at the value that is the behaviour of before
    "internalize.teacher_form": "system_sheet", "internalize.teacher_articles": "own",
    "internalize.teacher_answer_line": False,
}


def upgrade_hparams(stored: dict) -> dict:
    """Hparams as an older run folder's meta/run_info.json stored them, in today's form, so that the folder
    still resumes: REMOVED keys dropped (none of them changed results), RENAMED ones under their new name,
    ADDED ones at their old behaviour when missing."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in stored.items()}
    for dotted in REMOVED:
        section, key = dotted.split(".")
        value = out.get(section, {}).pop(key, None) if isinstance(out.get(section), dict) else None
        if dotted in RENAMED and value is not None:
            new_section, new_key = RENAMED[dotted].split(".")
            out[new_section].setdefault(new_key, value)
    for dotted, value in ADDED.items():
        section, key = dotted.split(".")
        if isinstance(out.get(section), dict):
            out[section].setdefault(key, value)
    return out


_POSITIVE = {  # numbers that must be > 0 (a zero learning rate or clipping norm trains nothing)
    "bootstrap.learning_rate", "internalize.learning_rate", "baseline_lora.learning_rate",
    "baseline_cake.learning_rate", "lora.alpha", "baseline_lora.alpha", "baseline_cake.alpha",
    "bootstrap.max_grad_norm", "internalize.max_grad_norm", "optimizer.adam_eps",
}
_UNIT_INTERVAL = {  # must lie in [0, 1]
    "lora.dropout", "bootstrap.top_p", "internalize.top_p", "bootstrap.warmup_ratio",
    "internalize.warmup_ratio", "internalize.repetition_threshold", "baseline_lora.dropout",
    "baseline_cake.dropout", "optimizer.adam_beta1", "optimizer.adam_beta2",
}

_BETAS = {"optimizer.adam_beta1", "optimizer.adam_beta2"}  # also < 1


def preset_names() -> list[str]:
    return sorted(p.stem for p in HPARAMS_DIR.glob("*.toml"))


def load_hparams(name_or_path: str | Path) -> CausalEditConfig:
    """Load a preset by name (code_edit/hparams/{name}.toml) or any TOML file by path."""
    path = _resolve(str(name_or_path), base_dir=None)
    raw = _load_chain(path, seen=())
    return _build(CausalEditConfig, raw, prefix="", origin=path, name=path.stem)


def _resolve(ref: str, base_dir: Path | None) -> Path:
    looks_like_path = ref.endswith(".toml") or "/" in ref or "\\" in ref
    if looks_like_path:
        p = Path(ref).expanduser()
        if not p.is_absolute() and base_dir is not None:
            p = base_dir / p
        if not p.is_file():
            raise HparamsError(f"hparams file not found: {p}")
        return p.resolve()
    p = HPARAMS_DIR / f"{ref}.toml"
    if not p.is_file():
        raise HparamsError(f"unknown preset {ref!r}; presets: {', '.join(preset_names())}")
    return p


def _load_chain(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    """Read `path`; if it has `extends`, deep-merge it over the preset it names."""
    if path in seen:
        raise HparamsError(f"{path}: 'extends' cycle: {' -> '.join(str(p) for p in seen + (path,))}")
    if len(seen) >= MAX_EXTENDS_DEPTH:
        raise HparamsError(f"{path}: 'extends' chain deeper than {MAX_EXTENDS_DEPTH}")
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise HparamsError(f"{path}: invalid TOML: {e}") from e
    parent = raw.pop("extends", None)
    _tag_origin(raw, path)
    if parent is None:
        return raw
    if not isinstance(parent, str):
        raise HparamsError(f"{path}: key 'extends' must be a preset name or a .toml path")
    base = _load_chain(_resolve(parent, path.parent), seen + (path,))
    return _merge(base, raw)


# Each leaf remembers the file it came from so that errors name the right file.
class _Leaf(typing.NamedTuple):
    value: Any
    origin: Path


def _tag_origin(table: dict[str, Any], path: Path) -> None:
    for k, v in table.items():
        if isinstance(v, dict):
            _tag_origin(v, path)
        else:
            table[k] = _Leaf(v, path)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _build(cls: type, raw: dict[str, Any], *, prefix: str, origin: Path, name: str | None = None):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "name"}
    for key, val in raw.items():
        if key not in fields:
            where = val.origin if isinstance(val, _Leaf) else origin
            if prefix + key in REMOVED:
                raise HparamsError(f"{where}: key {prefix + key!r} {REMOVED[prefix + key]}; delete it from the file")
            raise HparamsError(f"{where}: unknown key {prefix + key!r}; allowed here: {', '.join(fields)}")
    kwargs: dict[str, Any] = {}
    for fname in fields:
        key = prefix + fname
        typ = hints[fname]
        if fname not in raw:
            raise HparamsError(f"{origin}: missing key {key!r} (give it, or 'extends' a preset that does)")
        val = raw[fname]
        if dataclasses.is_dataclass(typ):
            if not isinstance(val, dict):
                where = val.origin if isinstance(val, _Leaf) else origin
                raise HparamsError(f"{where}: key {key!r} must be a table [{key}]")
            kwargs[fname] = _build(typ, val, prefix=key + ".", origin=origin)
        else:
            if isinstance(val, dict):
                raise HparamsError(f"{origin}: key {key!r} must be a value, not a table")
            kwargs[fname] = _check_value(key, typ, val.value, val.origin)
    if name is not None:
        kwargs["name"] = name
    cfg = cls(**kwargs)
    if cls is CausalEditConfig:
        _validate(cfg, origin)
    return cfg


def _check_value(key: str, typ: Any, value: Any, origin: Path) -> Any:
    def bad(expected: str) -> HparamsError:
        return HparamsError(f"{origin}: key {key!r} must be {expected}, got {type(value).__name__} {value!r}")

    if typ == bool | str:  # a switch with named settings besides on and off
        if isinstance(value, bool):
            return value
        if value not in _CHOICES[key]:
            raise bad(f"true, false or one of {_CHOICES[key]}")
        return value
    if typ is bool:
        if not isinstance(value, bool):
            raise bad("a boolean")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        if key not in _FREE_INTS and value < (0 if key in _ZERO_OK else 1):
            raise bad("a non-negative integer" if key in _ZERO_OK else "a positive integer")
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        value = float(value)
        if not math.isfinite(value):
            raise bad("a finite number")
        if key in _POSITIVE and value <= 0:
            raise bad("a number > 0")
        if key in _UNIT_INTERVAL and not 0.0 <= value <= 1.0:
            raise bad("a number in [0, 1]")
        if key in _BETAS and value >= 1.0:  # AdamW refuses beta = 1, at the first unit's optimiser
            raise bad("a number in [0, 1)")
        if key not in _UNIT_INTERVAL and value < 0:
            raise bad("a non-negative number")
        return value
    if typ is str:
        if not isinstance(value, str):
            raise bad("a string")
        if key in _CHOICES and value not in _CHOICES[key]:
            raise bad(f"one of {_CHOICES[key]}")
        if not value:
            raise bad("a non-empty string")
        return value
    if typing.get_origin(typ) is tuple:
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            raise bad("a non-empty list of strings")
        return tuple(value)
    raise TypeError(f"config field {key!r} has an unsupported type {typ!r}")  # programming error


def _validate(cfg: CausalEditConfig, origin: Path) -> None:
    """Cross-field rules the per-key checks cannot see."""
    if cfg.teacher_use_sft and not cfg.student_use_sft:
        # The reference crashes here (docs/method.md 8.3 item 9); we refuse it up front.
        raise HparamsError(f"{origin}: teacher_use_sft = true needs student_use_sft = true")
    it = cfg.internalize
    if it.prompts_per_step % it.micro_batches:
        raise HparamsError(
            f"{origin}: key 'internalize.prompts_per_step' ({it.prompts_per_step}) must be a multiple of "
            f"'internalize.micro_batches' ({it.micro_batches}) so every micro-batch holds whole prompt groups"
        )
    for key, t in (("bootstrap.temperature", cfg.bootstrap.temperature), ("internalize.temperature", it.temperature)):
        if t <= 0:
            raise HparamsError(f"{origin}: key {key!r} must be > 0 (sampling), got {t}")
    if it.kd_temperature <= 0 or it.seq_weight_temperature <= 0:
        raise HparamsError(f"{origin}: keys 'internalize.kd_temperature' and 'internalize.seq_weight_temperature' must be > 0")
