"""Before a long run: say what it needs and whether this machine has it (`python -m code_edit preflight`).

Checks a CUDA GPU and its free memory against the presets, access to the model weights (HF token for
gated Llama weights, or the weights already cached), the datasets (cached or downloadable), and the
judge endpoint (or that the strict offline grader will be used). Never prints a secret.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from code_edit.config import load_hparams
from code_edit.data import DOWNLOADED, REFERENCE_COMMIT, dataset_url, default_cache_root

# Parameter counts of the preset models (for the memory estimate; others are read from config.json if cached).
KNOWN_PARAMS = {"Qwen/Qwen2.5-7B-Instruct": 7.62e9, "meta-llama/Llama-3.1-8B-Instruct": 8.03e9,
                "smollm2-135m-instruct": 0.135e9, "tiny-random": 0.004e9}
WORKING_GIB = 16.0  # [estimate] sampling KV caches, SFT/distillation activations (checkpointed), optimizer, CUDA graphs
GATED_PREFIXES = ("meta-llama/",)


@dataclass
class Check:
    status: str  # "OK" | "FAIL" | "note"
    what: str
    message: str

    def line(self) -> str:
        return f"[{self.status:^4}] {self.what}: {self.message}"


# Probes (module-level so tests can replace them; none of them touches the network unless called).

def can_connect(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def cuda_memory() -> tuple[str, float, float] | None:
    """(device name, free GiB, total GiB) of the current CUDA device, or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return torch.cuda.get_device_name(), free / 2**30, total / 2**30


def hf_token_source() -> str | None:
    """Where an HF token would come from (never the token itself), or None."""
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if os.environ.get(var, "").strip():
            return f"${var}"
    try:
        from huggingface_hub import get_token

        return "the cached `huggingface-cli login`" if get_token() else None
    except Exception:
        return None


def hub_cached(repo: str) -> bool:
    """Whether config.json and weights of a hub repo are already in the local HF cache."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    cfg = try_to_load_from_cache(repo, "config.json")
    if not isinstance(cfg, str):
        return False
    folder = Path(cfg).parent
    return any(folder.glob("*.safetensors"))


def _dataset_file(name: str) -> Path:
    return default_cache_root() / "datasets" / REFERENCE_COMMIT[:12] / f"{name}_causalenhanced.json"


def _weights_gib(source: str, dtype: str) -> float:
    bytes_per = {"bfloat16": 2, "float16": 2, "float32": 4}.get(dtype, 2)
    return KNOWN_PARAMS.get(source, 8e9) * bytes_per / 2**30


def preflight(presets: list[str], datasets: list[str], *, judge_base_url: str | None = None,
              api_key_file: str | None = None, need_gpu: bool = True) -> list[Check]:
    """One check per need of the presets and datasets: the GPU, the weights, the data, the judge."""
    cfgs = [load_hparams(p) for p in presets]
    return [_gpu_check(cfgs, need_gpu), *_weights_checks(cfgs), *_dataset_checks(datasets),
            *_judge_checks(judge_base_url, api_key_file)]


def _gpu_check(cfgs: list, need_gpu: bool) -> Check:
    need = max((_weights_gib(c.model.source, c.model.dtype) + WORKING_GIB for c in cfgs), default=WORKING_GIB)
    mem = cuda_memory()
    if mem is None:
        import torch

        built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return Check("FAIL" if need_gpu else "note", "GPU",
                     f"no CUDA GPU visible (torch {torch.__version__}, {built}); these presets need one GPU "
                     f"with about {need:.0f} GiB free (bf16 weights + ~{WORKING_GIB:.0f} GiB working memory)")
    name, free, total = mem
    ok = free >= need
    return Check("OK" if ok else "FAIL", "GPU",
                 f"{name}: {free:.1f} of {total:.1f} GiB free; the presets need about {need:.0f} GiB "
                 f"(largest bf16 weights + ~{WORKING_GIB:.0f} GiB working memory)"
                 + ("" if ok else "; free memory or use a larger GPU"))


def _weights_checks(cfgs: list) -> list[Check]:
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip() not in ("", "0")
    hub_online = None
    checks = []
    for c in cfgs:
        src = c.model.source
        if Path(src).expanduser().exists() or src in ("smollm2-135m-instruct", "tiny-random"):
            checks.append(Check("OK", f"weights {src}", "local / embedded"))
            continue
        if hub_cached(src):
            checks.append(Check("OK", f"weights {src}", "already in the Hugging Face cache"))
            continue
        if hub_online is None:
            hub_online = (not offline) and can_connect("huggingface.co")
        gated = src.startswith(GATED_PREFIXES)
        token = hf_token_source() if gated else None
        size = _weights_gib(src, c.model.dtype)
        if not hub_online:
            checks.append(Check("FAIL", f"weights {src}",
                                "not in the Hugging Face cache and huggingface.co is unreachable"
                                + (" (HF_HUB_OFFLINE is set)" if offline else "")
                                + "; download them on a machine with network or pass --model_path DIR"))
        elif gated and not token:
            checks.append(Check("FAIL", f"weights {src}",
                                f"gated model: accept its license on https://huggingface.co/{src} and give a token "
                                "(export HF_TOKEN=... or `huggingface-cli login`)"))
        else:
            via = f", token from {token}" if token else ""
            checks.append(Check("OK", f"weights {src}", f"will be downloaded on first use (~{size:.0f} GiB{via})"
                                + ("; the license must have been accepted on huggingface.co" if gated else "")))
    return checks


def _dataset_checks(datasets: list[str]) -> list[Check]:
    gh_online = None
    checks = []
    for name in datasets:
        if name not in DOWNLOADED:
            checks.append(Check("OK", f"dataset {name}", "bundled"))
            continue
        f = _dataset_file(name)
        if f.is_file():
            checks.append(Check("OK", f"dataset {name}", f"cached at {f}"))
            continue
        if gh_online is None:
            gh_online = can_connect("raw.githubusercontent.com")
        url = dataset_url(name)
        if gh_online:
            checks.append(Check("OK", f"dataset {name}", f"will be downloaded on first use from {url}"))
        else:
            checks.append(Check("FAIL", f"dataset {name}",
                                f"not cached and raw.githubusercontent.com is unreachable; fetch {url} by hand and "
                                f"put it at {f} (or pass --data_path FILE)"))
    return checks


def _judge_checks(judge_base_url: str | None, api_key_file: str | None) -> list[Check]:
    from eval.chat import ChatError, redact_url, resolve_api_keys

    try:
        keys = resolve_api_keys(api_key_file)
    except ChatError as e:
        return [Check("FAIL", "judge", str(e))]
    if keys or judge_base_url:
        where = redact_url(judge_base_url) if judge_base_url else "https://api.deepseek.com (default)"
        src = (f"{len(keys)} key(s) from " + (api_key_file or "$CODE_EDIT_API_KEYS / $OPENAI_API_KEY")) if keys \
            else "no key (a local server)"
        return [Check("OK", "judge", f"LLM judge at {where}; {src}")]
    return [Check("note", "judge", "no endpoint and no API key: the strict offline grader will be used "
                                   "(for the LLM judge set $CODE_EDIT_API_KEYS or $OPENAI_API_KEY, or a base URL)")]


def report(checks: list[Check]) -> tuple[str, bool]:
    ok = not any(c.status == "FAIL" for c in checks)
    lines = [c.line() for c in checks]
    lines.append("preflight: ready" if ok else "preflight: NOT ready (fix the FAIL lines above)")
    return "\n".join(lines), ok
