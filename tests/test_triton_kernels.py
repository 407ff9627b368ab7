"""The Triton attention kernels (infera/layers/triton_attention.py) against the PyTorch reference
(infera/layers/paged_attention.py) on small random paged layouts.

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1 is set before they are
imported); with CUDA they run on the GPU. :func:`test_kernels_compile_for_h100` compiles every
kernel variant the engine launches for sm_90 ahead of time, which needs no GPU: it catches what the
interpreter cannot (a construct or type the compiler rejects) and checks that no variant spills
registers.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    if "triton" in sys.modules:
        pytest.skip("triton was imported before its interpreter could be enabled; run this file on its own",
                    allow_module_level=True)
    # read as kernels are decorated (triton's own too, so before importing it) and by lazy imports at launch
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")
from infera.layers import triton_attention as ta  # noqa: E402

from infera.layers import paged_attention as pa  # noqa: E402
from infera.layers.attention import LayerKVCache  # noqa: E402
from infera.models import llama_native  # noqa: E402
from conftest import engine_logits  # noqa: E402

DEVICE = torch.device("cuda" if CUDA else "cpu")
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def random_cache(num_blocks: int, block_size: int, hkv: int, d: int, dtype: torch.dtype, int8: bool,
                 seed: int = 0) -> LayerKVCache:
    """A cache of random K/V; int8 ones are written through the reference store (scales included)."""
    g = torch.Generator().manual_seed(seed)
    k, v = (torch.randn(num_blocks * block_size, hkv, d, generator=g).to(dtype) for _ in range(2))
    if int8:
        kv = LayerKVCache(*(torch.zeros(num_blocks, block_size, hkv, d, dtype=torch.int8) for _ in range(2)),
                          *(torch.ones(num_blocks, block_size, hkv) for _ in range(2)))
        pa.store_kv(kv, k, v, torch.arange(num_blocks * block_size))
    else:
        kv = LayerKVCache(k.view(num_blocks, block_size, hkv, d), v.view(num_blocks, block_size, hkv, d))
    return kv


def to_device(kv: LayerKVCache) -> LayerKVCache:
    return LayerKVCache(*(None if t is None else t.to(DEVICE) for t in (kv.k, kv.v, kv.k_scale, kv.v_scale)))


def block_tables(lens: list[int], num_blocks: int, block_size: int, seed: int = 0) -> torch.Tensor:
    """Disjoint random blocks for each sequence (rows padded with unused blocks)."""
    width = max(1, max(-(-n // block_size) for n in lens))
    perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))
    return perm[:len(lens) * width].view(len(lens), width)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T) v in float64 with GQA, causal at the end: q [Tq, Hq, D], k/v [Tk, Hkv, D]."""
    g = q.shape[1] // k.shape[1]
    k, v = (x.double().repeat_interleave(g, dim=1) for x in (k, v))
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    mask = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool).tril(k.shape[0] - q.shape[0])
    return torch.einsum("hqk,khd->qhd", scores.masked_fill(~mask, float("-inf")).softmax(-1), v)


def max_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.cpu().double() - ref.double()).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_skips_padding_slots(dtype):
    """Rows go to their slots exactly (a strided V as the QKV split leaves it); slot -1 writes nothing."""
    kv = LayerKVCache(torch.zeros(8, 4, 2, 16, dtype=dtype, device=DEVICE), torch.zeros(8, 4, 2, 16, dtype=dtype,
                                                                                        device=DEVICE))
    qkv = torch.randn(6, 3, 2, 16).to(dtype).to(DEVICE)
    k, v = qkv[:, 1], qkv[:, 2]  # not contiguous: row stride 96
    slots = torch.tensor([5, -1, 17, 0, -1, 31], device=DEVICE)
    ta.store_kv(k, v, kv.k, kv.v, slots)
    flat_k, flat_v = kv.k.view(-1, 2, 16).cpu(), kv.v.view(-1, 2, 16).cpu()
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(flat_k[s], k[i].cpu()) and torch.equal(flat_v[s], v[i].cpu())
    written = [s for s in slots.tolist() if s >= 0]
    untouched = [s for s in range(32) if s not in written]
    assert not flat_k[untouched].any() and not flat_v[untouched].any()


def test_store_kv_int8_through_dispatch():
    """paged_attention.store_kv on an int8 cache writes values and scales as the CPU path does."""
    if not CUDA:
        pytest.skip("the dispatch sends only CUDA tensors to Triton")
    k, v = torch.randn(10, 2, 16), torch.randn(10, 2, 16)
    slots = torch.randperm(32)[:10]
    caches = []
    for device in ("cpu", DEVICE):
        kv = LayerKVCache(*(torch.zeros(8, 4, 2, 16, dtype=torch.int8, device=device) for _ in range(2)),
                          *(torch.ones(8, 4, 2, device=device) for _ in range(2)))
        pa.store_kv(kv, k.to(device), v.to(device), slots.to(device))
        caches.append(kv)
    for a, b in zip(*([c.k, c.v, c.k_scale, c.v_scale] for c in caches)):
        assert torch.equal(a, b.cpu())


@pytest.mark.parametrize("dtype,int8", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
@pytest.mark.parametrize("hq,hkv", [(6, 2), (4, 4)])
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("window", [0, 20])
def test_decode_attention(dtype, int8, hq, hkv, num_splits, window):
    """Split or not, GQA or not, a sliding window or not, against the reference; a context of 0 (a
    padded row) gives zeros."""
    lens = [1, 5, 16, 23, 70, 0]
    block_size, d = 4, 32
    kv = random_cache(128, block_size, hkv, d, dtype, int8)
    tables = block_tables(lens, 128, block_size)
    q = torch.randn(len(lens), hq, d, generator=torch.Generator().manual_seed(1)).to(dtype)
    ctx = torch.tensor(lens)
    out = ta.decode_attention(q.to(DEVICE), to_device(kv), tables.to(DEVICE), ctx.to(DEVICE), 0.3,
                              num_splits=num_splits, block_n=16, window=window)
    assert out.dtype == dtype
    for i, n in enumerate(lens[:-1]):
        k, v = pa.gather_kv(kv, tables[i], n, dtype)
        first = max(0, n - window) if window else 0
        ref = dense_attention(q[i:i + 1], k[first:], v[first:], 0.3)
        assert max_error(out[i:i + 1], ref) < TOL[dtype], f"sequence {i}"
    assert not out[-1].any()


@pytest.mark.parametrize("dtype,int8", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
def test_prefill_attention_paged_varlen(dtype, int8):
    """Chunks of one flat batch, with and without cached prefixes, read from the paged cache."""
    chunks = [(7, 7), (5, 12), (1, 9), (20, 45), (16, 16)]  # (query length, context length)
    hq, hkv, d, block_size = 6, 2, 32, 4
    kv = random_cache(64, block_size, hkv, d, dtype, int8)
    tables = block_tables([c for _, c in chunks], 64, block_size)
    q = torch.randn(sum(n for n, _ in chunks), hq, d, generator=torch.Generator().manual_seed(2)).to(dtype)
    cu = torch.tensor([0] + [n for n, _ in chunks]).cumsum(0)
    ctx = torch.tensor([c for _, c in chunks])
    out = ta.prefill_attention(q.to(DEVICE), to_device(kv), cu.to(DEVICE), ctx.to(DEVICE), tables.to(DEVICE),
                               max(n for n, _ in chunks), 0.3, block_m=16, block_n=16)
    for i, (n, c) in enumerate(chunks):
        s = int(cu[i])
        ref = dense_attention(q[s:s + n], *pa.gather_kv(kv, tables[i], c, dtype), 0.3)
        assert max_error(out[s:s + n], ref) < TOL[dtype], f"chunk {i}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tq,tk", [(7, 7), (5, 12), (70, 70), (1, 9)])
def test_chunk_attention(dtype, tq, tk):
    """One chunk over K/V rows as the layer has them: K contiguous, V a strided view of the QKV output."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(tq, 4, 32, generator=g).to(dtype)
    k = torch.randn(tk, 2, 32, generator=g).to(dtype)
    v = torch.randn(tk, 8, 32, generator=g).to(dtype)[:, 6:]
    out = ta.chunk_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), 0.2)
    assert max_error(out, dense_attention(q, k, v, 0.2)) < TOL[dtype]


# ---- the engine's attention through the kernels (the interpreter on CPU) ----------------------

@pytest.fixture
def triton_dispatch(monkeypatch):
    """Route paged_attention's store, prefill and decode to the Triton kernels for any device, as
    it does for CUDA tensors (and keep the CPU's native kernels and decoder stack out)."""
    def write_slots(k_cache, v_cache, k, v, slot_mapping):
        ta.store_kv(k, v, k_cache, v_cache, slot_mapping)

    def decode(q, kv, block_tables, context_lens, scale, query_start=None, window=0):
        assert query_start is None, "CUDA runs one-token decode queries only"
        return ta.decode_attention(q, kv, block_tables, context_lens, scale, num_splits=2, block_n=16, window=window)

    torch_prefill = pa.prefill_attention

    def prefill(q, k, v, scale, window=0):  # (windowed prefill runs through PyTorch on CUDA)
        return torch_prefill(q, k, v, scale, window) if window else ta.chunk_attention(q, k, v, scale)

    monkeypatch.setattr(pa, "_write_slots", write_slots)
    monkeypatch.setattr(pa, "load_cpu_extension", lambda: None)
    monkeypatch.setattr(llama_native, "ENABLED", False)
    monkeypatch.setattr(pa, "prefill_attention", prefill)
    monkeypatch.setattr(pa, "decode_attention", decode)




@pytest.mark.skipif(CUDA, reason="covered by tests/test_cuda.py on a GPU")
@pytest.mark.parametrize("kind,kv_cache_dtype", [("llama", "auto"), ("qwen3", "auto"), ("llama", "int8"),
                                                 ("gemma3_gguf", "auto")])
def test_engine_logits_through_triton(tiny_model, kind, kv_cache_dtype, request):
    """A tiny model's logits (prefill, chunked prefill over a cached prefix, decode; Gemma 3's
    sliding windows over a hybrid KV cache) are those of the PyTorch path."""
    from infera.engine.llm_engine import LLMEngine

    engine = LLMEngine(model=str(tiny_model(kind)), dtype="float32", kv_cache_memory="8MiB",
                       kv_cache_dtype=kv_cache_dtype)
    engine.runner.max_batched_query_len = 1  # as on CUDA: longer queries take the chunk kernel
    ids = engine.tokenizer.encode("Paged attention keeps the KV cache in blocks of tokens. " * 3)
    chunks = [len(ids) - 20, 13, 1, 1, 1, 1, 1, 1, 1]
    ref = engine_logits(engine, ids, chunks)
    request.getfixturevalue("triton_dispatch")
    assert (engine_logits(engine, ids, chunks) - ref).abs().max().item() <= 1e-4


@pytest.mark.skipif(CUDA, reason="covered by tests/test_cuda.py on a GPU")
def test_padded_graph_batch_matches_eager(tiny_model, triton_dispatch):
    """What a CUDA-graph replay computes (the step copied into static buffers, padded to its bucket
    with slot -1 and context 0), run eagerly: the same hidden states and KV writes as the step alone."""
    from infera.engine.cuda_graph import CUDAGraphRunner
    from infera.engine.llm_engine import LLMEngine
    from infera.engine.sequence import Sequence
    from infera.layers.attention import attention_metadata
    from infera.sampling_params import SamplingParams

    engine = LLMEngine(model=str(tiny_model("llama")), dtype="float32", kv_cache_memory="8MiB")
    runner, bm = engine.runner, engine.block_manager
    runner.max_batched_query_len = 1  # as on CUDA
    seqs = [Sequence(engine.tokenizer.encode(text), SamplingParams())
            for text in ("one two three", "a longer prompt of several more words than that", "x")]
    with torch.inference_mode():
        counts = [len(s.token_ids) for s in seqs]
        for s, n in zip(seqs, counts):
            assert bm.allocate_slots(s, n)
        ids, pos, meta = runner.prepare_inputs(seqs, counts)
        with attention_metadata(meta):
            runner.model(ids, pos)
        for s, n in zip(seqs, counts):
            bm.commit(s, n)
            s.append_token(7)
            assert bm.allocate_slots(s, 1)
        ids, pos, meta = runner.prepare_inputs(seqs, [1] * 3)
        cache = runner.kv_cache.data.clone()
        with attention_metadata(meta):
            eager = runner.model(ids, pos)
        written = runner.kv_cache.data.clone()
        runner.kv_cache.data.copy_(cache)
        graphs = CUDAGraphRunner(runner.model, 8, 16, runner.model.config.hidden_size, torch.float32, runner.device)
        graphs.slot_mapping[3:] = 5  # stale rows of an earlier, larger step
        graphs.context_lens[3:] = 9
        assert graphs.can_run(meta) and graphs.prepare(ids, pos, meta) == 4
        padded = graphs.forward(4)
    assert torch.allclose(padded[:3], eager, atol=1e-5)
    assert torch.allclose(runner.kv_cache.data, written, atol=1e-5)  # layer 1's K/V went through 4-row GEMMs
    slots = runner.kv_cache.data.flatten(2, 3).flatten(3)  # [K/V, layer, slot, values]
    changed = (slots != cache.flatten(2, 3).flatten(3)).any(-1).any(0).any(0).nonzero().flatten()
    assert sorted(changed.tolist()) == sorted(meta.slot_mapping.tolist())  # nothing written for padding
    assert not padded[3].isnan().any()


COMPILE_SCRIPT = textwrap.dedent("""
    import os, re, subprocess, tempfile
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource
    from infera.layers import triton_attention as ta

    def compile(kernel, types, constants, num_warps):
        \"\"\"Registers and spilled bytes on sm_90 (ptxas, as Triton runs it), and whether the PTX has MMA.\"\"\"
        names = list(kernel.arg_names)
        assert not (set(types) | set(constants)) - set(names)
        signature = {n: types.get(n, "constexpr" if n in constants else "i32") for n in names}
        # as the JIT specializes real launches: pointers 16-byte aligned, integers multiples of 16
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
                 if signature[n] not in ("constexpr", "fp32")}
        src = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}).asm["ptx"]
        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
            f.write(ptx)
            f.flush()
            log = subprocess.run([get_ptxas(90).path, "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", f.name,
                                  "-o", os.devnull], capture_output=True, text=True, check=True).stderr
        spills = sum(int(x) for x in re.findall(r"(\\d+) bytes spill", log))
        return int(re.search(r"Used (\\d+) registers", log).group(1)), spills, "mma" in ptx

    TORCH = {"*bf16": torch.bfloat16, "*fp32": torch.float32}
    for dtype, quant in [("*bf16", False), ("*fp32", False), ("*bf16", True)]:
        cache = "*i8" if quant else dtype
        types = {"q_ptr": dtype, "k_cache_ptr": cache, "v_cache_ptr": cache, "k_scale_ptr": "*fp32" if quant else cache,
                 "v_scale_ptr": "*fp32" if quant else cache, "block_tables_ptr": "*i64", "context_lens_ptr": "*i64",
                 "scale": "fp32", "stride_kb": "i64", "stride_vb": "i64"}
        common = dict(HEAD_DIM=128, BLOCK_D=128, QUANT=quant, UPCAST=False,
                      PRECISION="ieee" if dtype == "*fp32" else "tf32")
        block_n, warps = ta.decode_config(TORCH[dtype])
        for group in (2, 4):  # Qwen3-0.6B, Llama-3-8B
            consts = dict(common, GROUP=group, BLOCK_H=16, BLOCK_N=block_n, NUM_SPLITS=8)
            print("decode", dtype, quant, group, *compile(ta._decode_kernel, dict(types, o_part_ptr="*fp32",
                                                                                  lse_ptr="*fp32"), consts, warps))
        block_m, block_n, warps = ta.prefill_config(TORCH[dtype])
        consts = dict(common, GROUP=2, BLOCK_M=block_m, BLOCK_N=block_n)
        print("prefill", dtype, quant, 2, *compile(ta._prefill_kernel, dict(types, cu_seqlens_q_ptr="*i32",
                                                                             out_ptr=dtype), consts, warps))
        if not quant:
            consts = dict(HEAD_DIM=128, BLOCK_D=128, NUM_SPLITS=8, BLOCK_S=8)
            print("merge", dtype, quant, 0, *compile(ta._decode_merge_kernel, {"o_part_ptr": "*fp32",
                                                     "lse_ptr": "*fp32", "out_ptr": dtype}, consts, 4))
        rows = {"k_ptr": cache, "v_ptr": cache, "k_cache_ptr": cache, "v_cache_ptr": cache, "slot_ptr": "*i64"}
        print("store", dtype, quant, 0, *compile(ta._store_kv_kernel, rows, dict(WIDTH=1024, BLOCK=1024), 4))
    """)


@pytest.mark.slow
def test_kernels_compile_for_h100():
    """Every kernel variant compiles for sm_90 (no GPU needed), without register spills, and the
    16-bit attention dots use tensor-core MMA instructions."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except ImportError:
        pytest.skip("this triton cannot compile ahead of time for sm_90 here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parent.parent, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [line.split() for line in run.stdout.splitlines()]
    assert len(lines) == 3 * 4 + 2, run.stdout
    for kernel, dtype, quant, group, regs, spills, mma in lines:
        what = f"{kernel} {dtype} int8={quant} group={group}"
        assert int(spills) == 0, f"{what}: {regs} registers, {spills} bytes spilled"
        if kernel in ("decode", "prefill") and dtype == "*bf16":
            assert mma == "True", f"{what}: no MMA instructions"
