"""LoRA on named projections: add in place, switch off for the teacher (`disabled`), merge, remove,
snapshot/restore, and save/load in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`).

Base weights keep their names and tensors; `remove()` gives back the very same nn.Linear modules.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PEFT_PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraConfig:
    rank: int = 12
    alpha: float = 24
    dropout: float = 0.05
    targets: tuple[str, ...] = DEFAULT_TARGETS
    seed: int = 3407
    # Adapter parameters are fp32 "master" weights even on a bf16 base (as PEFT does by default):
    # Adam steps of lr ~1e-4 are below half a bf16 ulp of A (~1/sqrt(in) ~ 0.017), so bf16 adapters
    # would silently stop learning. The forward casts them to the activation dtype. None = base dtype.
    param_dtype: str | None = "float32"

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoraLinear(nn.Module):
    """y = x W^T + b + scale * dropout(x) A^T B^T. `weight`/`bias` are the base module's own frozen
    Parameters; when merged, `weight` holds W + scale*B@A and `base_weight` the untouched original."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, dropout: float, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.zeros(rank, self.in_features, dtype=dtype, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=dtype, device=dev))
        self.scale, self.dropout = scale, dropout
        self.disabled = False
        self.merged = False
        self.cast_once = 0  # the size of the group whose operands grouped_delta reads from op_A / op_B (see cast_once)
        self.training = base.training
        object.__setattr__(self, "_base_linear", base)  # kept unregistered: put back by remove()

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            if self.training and torch.is_grad_enabled() and not self.disabled:
                raise RuntimeError("LoRA is merged: the adapter gets no gradient; unmerge() before training")
            return F.linear(x, self.base_weight if self.disabled else self.weight, self.bias)
        out = F.linear(x, self.weight, self.bias)
        d = self.delta(x)
        # In place is safe: the base matmul does not save its output for backward. (A fused addmm_ is
        # a few % faster eagerly but slower under torch.compile, where this add fuses with the casts.)
        return out if d is None else out.add_(d, alpha=self.scale)

    def delta(self, x: Tensor) -> Tensor | None:
        """The unscaled adapter term B(A(dropout(x))), or None when the adapter is off or merged."""
        if self.disabled or self.merged:
            return None
        return grouped_delta(x, (self,))

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.lora_A.shape[0]}, "
                f"scale={self.scale:g}, dropout={self.dropout:g}, disabled={self.disabled}, merged={self.merged}")


RANK_ALIGN = 8  # the rank is padded with zeros to a multiple of this inside the products (see grouped_delta)


def groupable(mods: tuple[LoraLinear, ...]) -> bool:
    """Whether adapters on one input can run as one grouped product: all on, unmerged, and alike."""
    m0 = mods[0]
    return all(isinstance(m, LoraLinear) and not (m.disabled or m.merged) and m.scale == m0.scale
               and m.dropout == m0.dropout and m.training == m0.training and m.lora_A.shape[0] == m0.lora_A.shape[0]
               for m in mods)


def grouped_delta(x: Tensor, mods: tuple[LoraLinear, ...]) -> Tensor:
    """The unscaled adapter terms B_i(A_i(dropout_i(x))) of modules sharing the input x (q/k/v, gate/up),
    side by side along the last dim like their fused base product (see `groupable`). Two matmuls for the
    group: all A's in one (a batched one when each module drops its own mask, drawn in module order as
    separate calls would), all B's in one (block-diagonal). The rank is zero-padded to RANK_ALIGN inside:
    a 12-wide operand (24 bytes) misses the 16-byte alignment of the fast GEMM kernels, and the zeros add
    nothing, to the sums or to the gradients. On a bf16 base the fp32 masters are cast here (not x), unless
    sampling built the group's operands once (`cast_once`)."""
    m0 = mods[0]
    if m0.cast_once == len(mods) and not torch.is_grad_enabled():
        return F.linear(F.linear(x, m0.op_A), m0.op_B)
    A, B = group_operands(mods, x.dtype)
    drop = m0.training and m0.dropout > 0
    if drop and len(mods) > 1:
        xs = torch.stack([F.dropout(x, m0.dropout, True) for _ in mods]).flatten(1, -2)  # [n, N, in]
        h = torch.bmm(xs, A.view(len(mods), -1, A.shape[1]).transpose(1, 2))  # [n, N, rp]
        h = h.transpose(0, 1).reshape(*x.shape[:-1], -1)  # [..., n * rp], module-major like A's rows
    else:
        h = F.linear(F.dropout(x, m0.dropout, True) if drop else x, A)
    return F.linear(h, B)


def group_operands(mods: tuple[LoraLinear, ...], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """A group's two product operands: the A's stacked [n * rp, in] and the B's block-diagonal [sum out,
    n * rp], rank zero-padded to rp (a multiple of RANK_ALIGN), cast from the masters to `dtype`."""
    pad = -mods[0].lora_A.shape[0] % RANK_ALIGN
    A = torch.cat([F.pad(m.lora_A, (0, 0, 0, pad)) for m in mods]).to(dtype)
    B = torch.block_diag(*[F.pad(m.lora_B, (0, pad)) for m in mods]).to(dtype)
    return A, B


@contextlib.contextmanager
def cast_once(groups: list[tuple[LoraLinear, ...]], dtype: torch.dtype) -> Iterator[None]:
    """Inside the block (sampling: no gradient, no dropout, weights fixed) each group's operands
    (group_operands) are built once here instead of at every decode step, where their casts and copies
    were about an eighth of a small model's step. They live in buffers of the group's first module
    (op_A, op_B), refreshed in place on later entries, so CUDA graphs captured over them stay valid.
    Groups whose adapters are off, merged or training with dropout are left as they are, and forwards
    with gradients on never read the operands. The adapter must not change inside the block (no optimizer
    step, `restore` or `swapped`): the operands would not follow it until the next entry."""
    heads = []
    # Plain leaf tensors (no autograd history), so that they can be refreshed in place under inference mode;
    # inference_mode(False) would switch gradients back on, hence no_grad inside it.
    with torch.inference_mode(False), torch.no_grad():
        for mods in groups:
            m0 = mods[0]
            if not groupable(mods) or (m0.training and m0.dropout > 0):
                continue
            A, B = group_operands(mods, dtype)
            old_A, old_B = getattr(m0, "op_A", None), getattr(m0, "op_B", None)
            if old_A is not None and old_A.shape == A.shape and old_A.dtype == dtype and old_B.shape == B.shape:
                old_A.copy_(A)
                old_B.copy_(B)
            else:
                m0.register_buffer("op_A", A, persistent=False)
                m0.register_buffer("op_B", B, persistent=False)
            heads.append((m0, len(mods)))
    try:
        for m0, n in heads:
            m0.cast_once = n
        yield
    finally:
        for m0, _ in heads:
            m0.cast_once = 0


def lora_modules(model: nn.Module) -> list[tuple[str, LoraLinear]]:
    """(name, module) of every LoRA-wrapped linear in `model`, in module order: the one place they are found."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear)]


def _require(model: nn.Module) -> list[tuple[str, LoraLinear]]:
    mods = lora_modules(model)
    if not mods:
        raise ValueError("model has no LoRA; call add_lora() first")
    return mods


def _few(keys: list[str], n: int = 4) -> str:
    return repr(keys[:n])[:-1] + (", ...]" if len(keys) > n else "]")


def has_lora(model: nn.Module) -> bool:
    return bool(lora_modules(model))


def lora_config(model: nn.Module) -> LoraConfig:
    return _require(model)[0][1].config


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable adapter parameters (A then B per module, in module order)."""
    return [p for _, m in lora_modules(model) for p in (m.lora_A, m.lora_B)]


def _init(mods: list[tuple[str, LoraLinear]], seed: int) -> None:
    # Drawn on the CPU in fp32 from one seeded generator, so a seed gives the same adapter on any
    # device and dtype; kaiming-uniform with a=sqrt(5) = U(-1/sqrt(in), 1/sqrt(in)), as nn.Linear/PEFT.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in mods:
            a = torch.empty(m.lora_A.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)
            m.lora_A.copy_(a)
            m.lora_B.zero_()


def add_lora(model: nn.Module, cfg: LoraConfig | None = None) -> list[nn.Parameter]:
    """Replace every nn.Linear whose name ends in one of cfg.targets by a LoraLinear, in place.
    Freezes every base parameter (remove() restores the flags); returns the adapter parameters."""
    cfg = cfg or LoraConfig()
    if has_lora(model):
        raise ValueError(f"model already has LoRA ({len(lora_modules(model))} modules); remove() it first")
    if cfg.rank < 1 or not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"LoraConfig: rank must be >= 1 and 0 <= dropout < 1, got {cfg.rank}, {cfg.dropout}")
    if isinstance(cfg.targets, str) or not cfg.targets:
        raise ValueError(f"LoraConfig.targets: expected a list of module names, got {cfg.targets!r}")
    pdtype = getattr(torch, cfg.param_dtype, None) if cfg.param_dtype else None
    if cfg.param_dtype and not isinstance(pdtype, torch.dtype):
        raise ValueError(f"LoraConfig.param_dtype: {cfg.param_dtype!r} is not a torch dtype name")
    found = [(n, m) for n, m in model.named_modules()
             if type(m) is nn.Linear and n.rsplit(".", 1)[-1] in cfg.targets]
    missing = sorted(set(cfg.targets) - {n.rsplit(".", 1)[-1] for n, _ in found})
    if missing:
        raise ValueError(f"LoraConfig.targets: no nn.Linear named {missing} in the model")
    model._lora_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)
    mods = []
    for name, base in found:
        lora = LoraLinear(base, cfg.rank, cfg.scale, cfg.dropout, pdtype or base.weight.dtype)
        lora.config = cfg
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, lora)
        mods.append((name, lora))
    _init(mods, cfg.seed)
    return lora_parameters(model)


def set_dropout(model: nn.Module, p: float) -> None:
    """Change the adapter dropout (e.g. 0 for on-policy distillation, which trains with dropout off)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {p}")
    for _, m in _require(model):
        m.dropout = p


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model (the teacher) inside the block: no weight copy, one flag per module.
    Works while merged (uses the saved base weight); nests; restores the flags on exceptions;
    a no-op on a model without LoRA. (Under torch.compile each state is its own graph.)"""
    mods = [m for _, m in lora_modules(model)]
    before = [m.disabled for m in mods]
    try:
        for m in mods:
            m.disabled = True
        yield model
    finally:
        for m, d in zip(mods, before):
            m.disabled = d


@torch.no_grad()
def merge(model: nn.Module) -> None:
    """W <- W + scale*B@A (computed in fp32, rounded once), keeping the original W as `base_weight`
    so unmerge()/remove() restore it bit for bit. Costs one extra copy of the targeted weights. All or
    nothing: a failure halfway puts the merged modules back."""
    for name, m in _require(model):
        if m.merged:
            raise ValueError(f"{name}: LoRA is already merged")
    try:
        for _, m in lora_modules(model):
            m.register_buffer("base_weight", m.weight.detach().clone(), persistent=False)
            delta = (m.lora_B.float() @ m.lora_A.float()) * m.scale
            m.weight.copy_((m.weight.float() + delta).to(m.weight.dtype))
            m.merged = True
    except BaseException:  # out of memory halfway, say: no module stays merged
        for _, m in lora_modules(model):
            if "base_weight" in m._buffers:
                _put_back(m)
        raise


def _put_back(m: LoraLinear) -> None:
    """The saved base weight back into `weight` (exact, not W - scale*B@A)."""
    m.weight.copy_(m.base_weight)
    del m.base_weight
    m.merged = False


@contextlib.contextmanager
def merged_for_inference(model: nn.Module) -> Iterator[bool]:
    """Inside the block an active adapter is merged (one matmul per projection instead of three), then
    unmerged exactly; yields whether it merged. A no-op without LoRA, or while it is off or merged."""
    mods = lora_modules(model)
    if not mods or any(m.disabled or m.merged for _, m in mods):
        yield False
        return
    merge(model)
    try:
        yield True
    finally:
        unmerge(model)


@torch.no_grad()
def unmerge(model: nn.Module) -> None:
    """Put the saved base weight back (exact, not W - scale*B@A)."""
    for name, m in _require(model):
        if not m.merged:
            raise ValueError(f"{name}: LoRA is not merged")
    for _, m in lora_modules(model):
        _put_back(m)


def remove(model: nn.Module) -> None:
    """Drop the adapter: the original nn.Linear modules come back with the very same (bit-identical)
    weight tensors, and requires_grad flags are restored. Unmerges first if merged."""
    mods = _require(model)
    if any(m.merged for _, m in mods):
        unmerge(model)
    for name, m in mods:
        base = m._base_linear
        base.weight, base.bias = m.weight, m.bias  # same Parameters (also if .to() replaced them)
        base.train(m.training)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, base)
    flags = model.__dict__.pop("_lora_requires_grad", {})
    for n, p in model.named_parameters():
        p.requires_grad_(flags.get(n, p.requires_grad))


def lora_state(model: nn.Module) -> dict[str, Tensor]:
    """The live adapter tensors (no copy), keyed `model.layers.0.self_attn.q_proj.lora_A`."""
    return {f"{n}.{k}": getattr(m, k).detach() for n, m in _require(model) for k in ("lora_A", "lora_B")}


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    """A copy of the adapter weights (e.g. the frozen teacher adapter for S=T, or a reset point)."""
    return {k: v.clone() for k, v in lora_state(model).items()}


@torch.no_grad()
def restore(model: nn.Module, state: dict[str, Tensor], *, source: str = "state", peft_names: bool = False) -> None:
    """Copy adapter weights in place (the Parameter objects stay, so optimizers and captured CUDA
    graphs remain valid). Keys and shapes must match exactly; errors name `source` and the key."""
    live = lora_state(model)
    if any(m.merged for _, m in lora_modules(model)):
        raise ValueError("LoRA is merged: unmerge() before changing the adapter weights")
    missing, extra = sorted(live.keys() - state.keys()), sorted(state.keys() - live.keys())
    if missing or extra:
        raise ValueError(f"{source}: adapter keys differ from the model's: missing {_few(missing)}, "
                         f"unexpected {_few(extra)}")
    for k, t in live.items():
        if tuple(state[k].shape) != tuple(t.shape):
            key = f"{PEFT_PREFIX}{k}.weight" if peft_names else k
            raise ValueError(f"{source}: {key} has shape {tuple(state[k].shape)}, the model expects {tuple(t.shape)}")
    for k, t in live.items():
        t.copy_(state[k])


def reset(model: nn.Module, seed: int | None = None) -> None:
    """Re-draw A from the seed (default: the config's) and zero B, in place: a fresh adapter
    without rebuilding modules."""
    mods = _require(model)
    if any(m.merged for _, m in mods):
        raise ValueError("LoRA is merged: unmerge() before resetting the adapter")
    _init(mods, lora_config(model).seed if seed is None else seed)


@contextlib.contextmanager
def swapped(model: nn.Module, state: dict[str, Tensor]) -> Iterator[nn.Module]:
    """Run with other adapter weights inside the block (e.g. a teacher snapshot), then put the
    current ones back, also on exceptions. Bumps the parameters' version counters: call it outside
    any student forward whose backward is still pending."""
    current = snapshot(model)
    restore(model, state)
    try:
        yield model
    finally:
        restore(model, current)


# ---- PEFT format ------------------------------------------------------------------------------

def _peft_config(cfg: LoraConfig, base_model_name_or_path: str | None) -> dict:
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.rank, "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout, "target_modules": sorted(cfg.targets), "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "lora_bias": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "base_model_name_or_path": base_model_name_or_path, "revision": None,
    }


def save_adapter(model: nn.Module, directory: str | os.PathLike, *,
                 base_model_name_or_path: str | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors with PEFT key names
    (`base_model.model.<module>.lora_A.weight`), loadable by peft's PeftModel.from_pretrained and vLLM.
    A new directory appears complete (temp dir + rename); in an existing one each file is replaced
    atomically."""
    from safetensors.torch import save_file

    cfg = lora_config(model)
    tensors = {f"{PEFT_PREFIX}{k}.weight": v.contiguous().cpu() for k, v in lora_state(model).items()}
    config = json.dumps(_peft_config(cfg, base_model_name_or_path), indent=2) + "\n"
    out = Path(directory)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(config)
        if not out.exists():
            os.rename(tmp, out)
            return out
        for name in (WEIGHTS_FILE, CONFIG_FILE):  # config last: it is what loaders look for
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _read_config(path: Path) -> LoraConfig:
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no adapter config (expected a PEFT adapter directory)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object")
    for key in ("peft_type", "r", "lora_alpha", "target_modules"):
        if key not in raw:
            raise ValueError(f"{path}: missing field {key!r}")
    unsupported = {"peft_type": ("LORA",), "bias": ("none", None), "fan_in_fan_out": (False, None),
                   "use_rslora": (False, None), "use_dora": (False, None), "lora_bias": (False, None),
                   "modules_to_save": (None, []), "layers_to_transform": (None, []),
                   "rank_pattern": ({}, None), "alpha_pattern": ({}, None)}
    for key, ok in unsupported.items():
        if raw.get(key) not in ok:
            raise ValueError(f"{path}: {key}={raw[key]!r} is not supported (supported: {list(ok)})")
    targets = raw["target_modules"]
    if isinstance(targets, str) or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"{path}: target_modules must be a list of module names, got {targets!r}")
    if not isinstance(raw["r"], int) or raw["r"] < 1:
        raise ValueError(f"{path}: r must be a positive integer, got {raw['r']!r}")
    return LoraConfig(rank=raw["r"], alpha=raw["lora_alpha"], dropout=float(raw.get("lora_dropout") or 0.0),
                      targets=tuple(sorted(targets)))


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> list[nn.Parameter]:
    """Load a PEFT LoRA adapter. Without LoRA on the model it is added from the adapter's config;
    with LoRA, rank, alpha and targets must match. Returns the adapter parameters."""
    from safetensors import safe_open

    d = Path(directory)
    cfg = _read_config(d / CONFIG_FILE)
    wpath = d / WEIGHTS_FILE
    if not wpath.exists():
        raise FileNotFoundError(f"{wpath}: missing (only the safetensors format is supported)")
    if has_lora(model):
        have = lora_config(model)
        for field in ("rank", "alpha"):
            if getattr(have, field) != getattr(cfg, field):
                raise ValueError(f"{d / CONFIG_FILE}: {field} {getattr(cfg, field)} differs from the model's "
                                 f"LoRA ({getattr(have, field)}); remove() it first")
        if set(have.targets) != set(cfg.targets):
            raise ValueError(f"{d / CONFIG_FILE}: target_modules {sorted(cfg.targets)} differ from the "
                             f"model's LoRA ({sorted(have.targets)}); remove() it first")
    added = not has_lora(model)
    if added:
        add_lora(model, cfg)
    try:
        live = lora_state(model)
        state, unexpected = {}, []
        with safe_open(str(wpath), framework="pt") as f:
            for key in f.keys():
                ok = key.startswith(PEFT_PREFIX) and key.endswith(".weight")
                name = key[len(PEFT_PREFIX):-len(".weight")] if ok else None
                if name in live:
                    state[name] = f.get_tensor(key)
                else:
                    unexpected.append(key)
        missing = [f"{PEFT_PREFIX}{k}.weight" for k in live if k not in state]
        if unexpected or missing:
            raise ValueError(f"{wpath}: adapter keys do not fit the model: missing {_few(missing)}, "
                             f"unexpected {_few(unexpected)}")
        restore(model, state, source=str(wpath), peft_names=True)
    except Exception:
        if added:  # leave the model as it was
            remove(model)
        raise
    return lora_parameters(model)
