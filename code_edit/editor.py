"""Edit, evaluate, discard: one case (or one batch-edit group, docs/method.md 3.7) per call.

Every method starts from the pristine base weights: a fresh seeded LoRA is added, trained, used for
evaluation with eval.probes, optionally saved in PEFT format, and removed (never merged), so the
base tensors are bit-identical afterwards. Wall time and peak GPU memory are recorded per stage.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from code_edit.bootstrap import bootstrap
from code_edit.config import CausalEditConfig
from code_edit.tokens import chat_ids, completion_ids, derive_seed
from code_edit.data import EditRequest, case_has_articles
from code_edit.internalize import internalize
from eval.mquake import target_str
from eval.probes import GenConfig, case_record, evaluate_case, model_answer_fn, with_article
from model.generate import release
from model.lora import LoraConfig, add_lora, lora_parameters, remove, save_adapter, snapshot, swapped

log = logging.getLogger(__name__)

METHODS = ("CausalEdit", "LoRA", "CaKE", "InContext", "PreEdited")
_ALIASES = {
    "causaledit": "CausalEdit", "code": "CausalEdit", "lora": "LoRA", "cake": "CaKE",
    "incontext": "InContext", "in-context": "InContext", "icl": "InContext",
    "pre-edited": "PreEdited", "preedited": "PreEdited", "pre_edited": "PreEdited", "none": "PreEdited",
}
# Reference methods we do not implement: say so instead of silently running something else.
_NOT_HERE = {"adalora": "AdaLoRA", "wise": "WISE", "memit": "MEMIT", "rome": "ROME", "alphaedit": "AlphaEdit"}


def normalize_method(name: str) -> str:
    """The reference's alias normalisation (case-insensitive) onto our method names."""
    key = name.strip().lower()
    if key in _ALIASES:
        return _ALIASES[key]
    if key in _NOT_HERE:
        raise ValueError(f"--editing_method {name}: {_NOT_HERE[key]} is a baseline of the reference that code-edit "
                         f"does not implement; available: {', '.join(METHODS)}")
    raise ValueError(f"--editing_method {name!r} is unknown; available: {', '.join(METHODS)} "
                     f"(aliases: {', '.join(sorted(_ALIASES))})")


def needs_articles(method: str, cfg: CausalEditConfig) -> bool:
    """Methods that read the causal articles: causal-mode CODE (teacher cheat sheet) and InContext."""
    return (method == "CausalEdit" and cfg.editing_mode == "causal") or method == "InContext"


class Reporter:
    """Progress hooks the editor calls; the default does nothing (the CLI shows a progress bar)."""

    def stage(self, name: str) -> None:
        pass

    def tokens(self, n: int) -> None:
        pass


@dataclass
class Stages:
    """Wall seconds and peak GPU memory (torch.cuda.max_memory_allocated, reset per stage; 0 on CPU)."""

    device: torch.device
    reporter: Reporter
    seconds: dict[str, float] = field(default_factory=dict)
    peak: dict[str, int] = field(default_factory=dict)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        cuda = self.device.type == "cuda"
        self.reporter.stage(name)
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if cuda:
                torch.cuda.synchronize(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            mem = int(torch.cuda.max_memory_allocated(self.device)) if cuda else 0
            self.peak[name] = max(self.peak.get(name, 0), mem)

    def as_dict(self, names: Sequence[str] | None = None) -> dict[str, dict[str, float | int]]:
        return {n: {"seconds": round(self.seconds[n], 3), "peak_gpu_mem_bytes": self.peak[n]}
                for n in (names or self.seconds) if n in self.seconds}


@dataclass
class Editor:
    """What every unit needs: the model and tokenizer, the config, and where things go."""

    model: Any
    tok: Any
    cfg: CausalEditConfig
    method: str
    model_id: str  # model source string: part of the bootstrap cache key and the adapters' base name
    cache_dir: Path | None = None  # bootstrap candidate cache (None: no cache)
    adapters_dir: Path | None = None  # --save_adapters: PEFT adapters go here, one folder per unit
    reporter: Reporter = field(default_factory=Reporter)
    eval_batch_size: int | None = None
    answer_fn: Callable[[list[str]], list[str]] | None = None  # tests: replaces generation at evaluation

    def __post_init__(self) -> None:
        self.method = normalize_method(self.method)
        self.device = self.model.lm_head.weight.device
        self._warned_cake = False

    # ---------------------------------------------------------------- one unit

    def run_unit(self, unit_key: str, requests: Sequence[EditRequest], cases: Sequence[dict], *,
                 group: int | None = None) -> list[dict]:
        """Edit `requests` jointly, evaluate every case in `cases`, discard the edit; one metrics
        record per case (the case_record keys plus method, group, stages and edit_stats)."""
        stages = Stages(self.device, self.reporter)
        seed = derive_seed("unit", unit_key)
        torch.manual_seed(seed)  # dropout masks etc.: a resumed run redoes a unit exactly as a fresh one
        edit_stats: dict[str, Any] = {"edits": len(requests)}
        trained = self.method in ("CausalEdit", "LoRA", "CaKE")
        try:
            if self.method == "CausalEdit":
                self._causal_edit(requests, stages, edit_stats, seed)
            elif self.method == "LoRA":
                self._lora_baseline(requests, cases, stages, edit_stats)
            elif self.method == "CaKE":
                self._cake_baseline(requests, cases, stages, edit_stats)
            edit_seconds = sum(stages.seconds.values())
            train_stages = list(stages.seconds)
            records = []
            for case in cases:
                with stages(f"eval:{case['case_id']}"):
                    post = self._evaluate(case)
                names = train_stages + [f"eval:{case['case_id']}"]
                rec = case_record(case, post, edit_seconds)
                st = stages.as_dict(names)
                st["eval"] = st.pop(f"eval:{case['case_id']}")
                rec.update({"method": self.method, "unit": unit_key, "stages": st, "edit_stats": edit_stats})
                if group is not None:
                    rec["group"] = group
                records.append(rec)
            if trained and self.adapters_dir is not None:
                save_adapter(self.model, self.adapters_dir / unit_key, base_model_name_or_path=self.model_id)
            return records
        finally:
            if trained and _has_lora(self.model):
                remove(self.model)
                release(self.model)  # its CUDA graphs point at the adapter just removed

    # ---------------------------------------------------------------- methods

    def _causal_edit(self, requests, stages: Stages, stats: dict, seed: int) -> None:
        cfg, model = self.cfg, self.model
        if cfg.editing_mode == "causal":
            for req in requests:
                if not req.article:
                    raise ValueError(f"{req.where}: causal editing needs an article (causal scaffold)")
        lc = cfg.lora
        add_lora(model, LoraConfig(rank=lc.rank, alpha=lc.alpha, dropout=lc.dropout, targets=lc.target_modules,
                                   seed=lc.init_seed))
        if cfg.student_use_sft:
            # 1) causal bootstrapping: open-book thoughts, then SFT of the fresh adapter on them
            data = bootstrap(model, self.tok, requests, cfg, cache_dir=self.cache_dir, model_id=self.model_id,
                             seed=derive_seed(seed, "bootstrap"), stage=stages, on_tokens=self.reporter.tokens,
                             log_fn=_every(10, "sft"))
            stats["bootstrap"], stats["sft"] = data.stats, _summary(data.sft)
        teacher = None
        if cfg.teacher_use_sft == cfg.student_use_sft:
            # S=T: the teacher is a frozen snapshot of the student adapter as stage 2 begins (docs/method.md 3.4).
            snap = snapshot(model)
            teacher = lambda: swapped(model, snap)  # noqa: E731
        with stages("internalize"):
            summary = internalize(model, self.tok, requests, cfg, seed=derive_seed(seed, "internalize"),
                                  teacher=teacher, on_step=self._on_distill_step)  # 2) causal internalization
        # 3) the evaluation follows in run_unit, as for every method
        stats["internalize"] = {k: v for k, v in summary.items() if k != "history"}
        release(model)

    def _on_distill_step(self, step: int, total: int, stats: dict) -> None:
        n, length = stats.get("rollouts"), stats.get("completion_length")
        if isinstance(n, (int, float)) and isinstance(length, (int, float)):
            self.reporter.tokens(int(n * length))

    def _lora_baseline(self, requests, cases, stages: Stages, stats: dict) -> None:
        """Static fact overwriting: the edit question and its cloze -> the new answer (docs/method.md 8.2)."""
        bl = self.cfg.baseline_lora
        examples = []
        for req in requests:
            for q in (req.question, req.cloze):
                examples.append(self._qa_ids(q, req.new_answer))
        self._baseline_sft(examples, stages, stats, rank=bl.rank, alpha=bl.alpha, dropout=bl.dropout,
                           targets=bl.target_modules, lr=bl.learning_rate, epochs=bl.epochs,
                           batch_size=bl.batch_size, weight_decay=bl.weight_decay, max_length=bl.max_length)

    def _cake_baseline(self, requests, cases, stages: Stages, stats: dict) -> None:
        """CaKE augmentation SFT: cloze -> new answer, rephrase Q -> A, learning Q -> A + "." (docs/method.md 8.2).
        Without rephrase/learning prompts (MQuAKE-hard) it trains on the edit question and the cloze."""
        bc = self.cfg.baseline_cake
        rewrites = {(c["case_id"], r): rw for c in cases for r, rw in enumerate(c["requested_rewrite"])}
        examples = []
        for req in requests:
            rw = rewrites.get((req.case_id, req.rewrite_idx), {})
            pairs = [(req.cloze, req.new_answer)]
            extra = [(qa, "") for qa in rw.get("rephrase_prompt", [])] + [(qa, ".") for qa in rw.get("learning_prompt", [])]
            for j, (qa, tail) in enumerate(extra):
                ans = qa.get("answer")
                ans = target_str(ans) if isinstance(ans, dict) else ans
                if not isinstance(ans, str) or not ans.strip():
                    raise ValueError(f"{req.where}: CaKE prompt #{j} ({qa.get('question')!r}) has no answer")
                pairs.append((qa["question"], ans + tail))
            if not extra:
                if not self._warned_cake:
                    log.warning("CaKE: %s has no rephrase/learning prompts (e.g. MQuAKE-hard); training on the edit "
                                "question and the cloze only", req.where)
                    self._warned_cake = True
                pairs.append((req.question, req.new_answer))
            examples += [self._qa_ids(q, a) for q, a in pairs]
        self._baseline_sft(examples, stages, stats, rank=bc.rank, alpha=bc.alpha, dropout=bc.dropout,
                           targets=bc.target_modules, lr=bc.learning_rate, epochs=bc.epochs,
                           batch_size=bc.batch_size, weight_decay=self.cfg.optimizer.weight_decay,
                           max_length=bc.max_length)

    def _qa_ids(self, question: str, answer: str) -> tuple[list[int], list[int]]:
        """Chat-format example: user turn = the question, assistant turn = the answer + end of turn."""
        return chat_ids(self.tok, [{"role": "user", "content": question}]), completion_ids(self.tok, answer)

    def _baseline_sft(self, examples, stages: Stages, stats: dict, *, rank, alpha, dropout, targets, lr, epochs,
                      batch_size, weight_decay, max_length) -> None:
        from train.sft import SFTConfig, sft

        add_lora(self.model, LoraConfig(rank=rank, alpha=alpha, dropout=dropout, targets=targets,
                                        seed=self.cfg.lora.init_seed))
        # No warmup, no early stop, clipping at 1.0 (HF Trainer's max_grad_norm). The schedule is SFTConfig's
        # default cosine, and the [optimizer] Adam keys do not reach the baselines (HF Trainer's default
        # schedule is linear: a known difference, docs/config.md).
        scfg = SFTConfig(lr=lr, epochs=epochs, batch_size=batch_size, warmup_ratio=0.0, max_grad_norm=1.0,
                         weight_decay=weight_decay, stop_loss=None, stop_consecutive=1, max_length=max_length,
                         grad_checkpointing=self.cfg.model.grad_checkpointing, seed=self.cfg.bootstrap.seed)
        with stages("sft"):
            stats["sft"] = _summary(sft(self.model, examples, lora_parameters(self.model), scfg, log=None))
        stats["sft"]["examples"] = len(examples)

    # ---------------------------------------------------------------- evaluation

    def gen_config(self) -> GenConfig:
        e = self.cfg.eval
        return GenConfig(max_new_tokens=e.max_new_tokens, temperature=e.temperature,
                         repetition_penalty=e.repetition_penalty, batch_size=self.eval_batch_size, seed=0)

    def _evaluate(self, case: dict) -> dict:
        base = self.answer_fn or model_answer_fn(self.model, self.tok, self.gen_config())

        def answer(prompts: list[str]) -> list[str]:
            preds = base(prompts)
            self.reporter.tokens(sum(len(self.tok.encode(p)) for p in preds))
            return preds

        fn = answer
        if self.method == "InContext":
            fn = in_context_answer_fn(answer, case)
        return evaluate_case(self.model, self.tok, case, self.gen_config(), answer_fn=fn)


def in_context_answer_fn(answer: Callable[[list[str]], list[str]], case: dict) -> Callable[[list[str]], list[str]]:
    """InContext: every evaluation prompt of the case is asked after the case's articles (all its
    rewrites', in rewrite order, blank-line separated) under the causal-enhanced prefix of eval.probes.
    The stored prompts stay the plain probe prompts."""
    if not case_has_articles(case):
        raise ValueError(f"case_id {case['case_id']}: InContext needs an article for every rewrite")
    articles = "\n\n".join(rw["article"].strip() for rw in case["requested_rewrite"])
    return lambda prompts: answer([with_article(p, articles) for p in prompts])


def _has_lora(model: Any) -> bool:
    from model.lora import has_lora

    return has_lora(model)


def _every(n: int, what: str):
    """A training-log callback that writes every n-th step to the run log (floats to 4 significant digits:
    a learning rate of 3e-5 must not print as 0.0)."""
    def log_step(d: dict) -> None:
        if d.get("step", 0) % n == 0:
            log.info("%s %s", what, {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in d.items()})
    return log_step


def _summary(stats: Any) -> dict:
    """The scalar part of a training stats dict (per-step histories stay in the log)."""
    if not isinstance(stats, dict):
        return {}
    return {k: v for k, v in stats.items() if isinstance(v, (int, float, str, bool)) or v is None}
