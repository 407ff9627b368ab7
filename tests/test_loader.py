"""Loading errors name the file and the problem; the CLI prints them as one line."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import gguf
import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from infera.engine.llm_engine import LLMEngine
from infera.loader.errors import ModelLoadError
from infera.loader.model_loader import open_model


def test_missing_path():
    with pytest.raises(ModelLoadError, match="no such file"):
        open_model("/nonexistent/model.gguf")


def test_garbage_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all" * 100)
    with pytest.raises(ModelLoadError, match=r"bad\.gguf.*GGUF"):
        open_model(bad)


def test_truncated_gguf(tmp_path, bundled_model_path):
    cut = tmp_path / "cut.gguf"
    with open(bundled_model_path, "rb") as src:
        cut.write_bytes(src.read(2_000_000))
    with pytest.raises(ModelLoadError, match="cut.gguf"):
        LLMEngine(model=str(cut))


def test_unsupported_gguf_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="unsupported architecture 'gpt2'"):
        open_model(path)


def test_directory_without_safetensors(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        open_model(tmp_path)


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_fast_reader_reads_what_gguf_py_reads(bundled_model_path):
    from infera.loader.gguf_file import FastGGUFReader

    ours, theirs = FastGGUFReader(bundled_model_path), gguf.GGUFReader(bundled_model_path)
    assert list(ours.fields) == list(theirs.fields)
    for name, field in theirs.fields.items():
        mine = ours.fields[name]
        assert (mine.offset, mine.data, mine.types) == (field.offset, field.data, field.types), name
        assert len(mine.parts) == len(field.parts), name
        assert all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(mine.parts, field.parts)), name
        assert mine.contents() == field.contents(), name
    assert [(t.name, t.tensor_type, t.data_offset) for t in ours.tensors] == \
        [(t.name, t.tensor_type, t.data_offset) for t in theirs.tensors]
    assert all(np.array_equal(a.data, b.data) for a, b in zip(ours.tensors, theirs.tensors))


def test_missing_tensor_named(tiny_model, tmp_path):
    path = copy_model(tiny_model("llama"), tmp_path / "m")
    weights = load_file(path / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="down_proj"):
        LLMEngine(model=str(path), dtype="float32", kv_cache_memory="8MiB")


def test_wrong_shape_named(tiny_model, tmp_path):
    path = copy_model(tiny_model("llama"), tmp_path / "m")
    weights = load_file(path / "model.safetensors")
    weights["model.layers.0.self_attn.o_proj.weight"] = weights["model.layers.0.self_attn.o_proj.weight"][:, :10].contiguous()
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="o_proj.*shape"):
        LLMEngine(model=str(path), dtype="float32", kv_cache_memory="8MiB")


def test_unsupported_hf_architecture(tiny_model, tmp_path):
    path = copy_model(tiny_model("llama"), tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["FancyNewForCausalLM"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="unsupported architecture 'FancyNewForCausalLM'"):
        LLMEngine(model=str(path), dtype="float32", kv_cache_memory="8MiB")


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "mixtral", "qwen3_moe", "gemma3_gguf"])
def test_gguf_written_from_hf_matches_hf(tiny_model, bundled_model_path, tmp_path, kind):
    """write_gguf lays a model out as llama.cpp does (permuted Q/K rows, expert stacks); loading it
    back gives HF's logits on the original weights, whatever the architecture."""
    import torch

    from conftest import engine_logits
    from infera.loader.gguf_writer import write_gguf
    from test_models_vs_hf import PROMPT, hf_logits

    path = write_gguf(tiny_model(kind), tmp_path / f"{kind}.gguf", bundled_model_path)
    engine = LLMEngine(model=str(path), dtype="float32", kv_cache_memory="32MiB")
    assert engine.hf_config.architectures == json.loads((tiny_model(kind) / "config.json").read_text())["architectures"]
    ids = engine.tokenizer.encode(PROMPT)
    ref = hf_logits(tiny_model(kind), ids, torch.float32)
    diff = (engine_logits(engine, ids, [len(ids) - 4, 1, 1, 1, 1]) - ref).abs().max().item()
    assert diff <= 1e-4, f"{kind} from GGUF: max |diff| {diff:.2e}"


def test_writing_an_unsupported_model_type_as_gguf_is_refused(tiny_model, bundled_model_path, tmp_path):
    from infera.loader.gguf_writer import write_gguf

    with pytest.raises(ValueError, match="qwen2_moe"):
        write_gguf(tiny_model("qwen2_moe"), tmp_path / "x.gguf", bundled_model_path)
    with pytest.raises(ValueError, match="layer pattern"):  # a Gemma 3 that the format cannot describe
        write_gguf(tiny_model("gemma3"), tmp_path / "g.gguf", bundled_model_path)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "infera.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_help():
    out = run_cli("--help")
    assert out.returncode == 0 and "generate" in out.stdout and "chat" in out.stdout
    out = run_cli("generate", "--help")
    assert out.returncode == 0 and "--max-tokens" in out.stdout and "--kv-cache-memory" in out.stdout


def test_cli_bad_model_is_one_line():
    out = run_cli("generate", "hello", "--model", "/nonexistent/x.gguf")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().endswith("/nonexistent/x.gguf: no such file or directory")


def test_cli_generate(tiny_model):
    out = run_cli("generate", "hello there", "--model", str(tiny_model("llama")), "--max-tokens", "5",
                  "--dtype", "float32", "--ignore-eos", "--log-level", "WARNING")
    assert out.returncode == 0, out.stderr
    assert "(5 tokens, length)" in out.stdout
