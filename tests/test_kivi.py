"""The 2-bit KV cache (``kv_cache_dtype='kivi2'``, infera.layers.kivi): quantization round trip within
its bound, native stores bit-identical to PyTorch's at every ISA level, attention equal to an oracle
(each query reads exact 16-bit keys and values in block 0 and its residual zone, elsewhere keys
quantized per channel of a block and values per token), and in the engine the same greedy tokens
however requests are batched, chunked, cached, preempted, forked or speculated, with every block
and staging slot freed."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from infera import LLM, SamplingParams
from infera.engine import kv_cache
from infera.engine.block_manager import BlockManager
from infera.engine.model_runner import ModelRunner
from infera.engine.sequence import Sequence
from infera.layers import kivi
from infera.layers.attention import LayerKVCache
from infera.eval.perplexity import corpus
from conftest import engine_logits


@pytest.mark.parametrize("shape", [(3, 16), (5, 64), (2, 256)])
def test_round_trip_within_half_a_step(shape):
    torch.manual_seed(0)
    rows, dim = shape
    v = torch.randn(7, rows, dim) * torch.linspace(0.1, 4, dim)
    packed, params = kivi.quantize_values(v)
    assert packed.shape == (7, rows, dim // 4) and params.shape == (7, rows, 2, dim // kivi.value_group(dim))
    assert torch.equal(kivi.unpack(kivi.pack(kivi.unpack(packed))), kivi.unpack(packed))
    step = params[..., 0, :].float().repeat_interleave(kivi.value_group(dim), dim=-1)
    err = (kivi.dequantize_values(packed, params) - v).abs()
    assert (err <= step / 2 * 1.01 + 1e-6).all()  # half a step (bfloat16 parameters: 1% slack)
    k = torch.randn(4, 8, rows, dim) + torch.randn(dim) * 5  # outlier channels: per channel keeps them apart
    packed, params = kivi.quantize_keys(k)
    assert packed.shape == (4, 8, rows, dim // 4) and params.shape == (4, rows, 2, dim)
    err = (kivi.dequantize_keys(packed, params) - k).abs()
    assert (err <= params[:, None, :, 0].float() / 2 * 1.01 + 1e-6).all()
    assert set(kivi.unpack(packed).unique().tolist()) <= {0, 1, 2, 3}


def layer_cache(num_blocks: int, bs: int, heads: int, dim: int, slots: int, dtype=torch.float32) -> LayerKVCache:
    g = kivi.value_group(dim)
    return LayerKVCache(torch.zeros(num_blocks, bs, heads, dim // 4, dtype=torch.uint8),
                        torch.zeros(num_blocks, bs, heads, dim // 4, dtype=torch.uint8),
                        k_params=torch.zeros(num_blocks, heads, 2, dim, dtype=kivi.PARAM_DTYPE),
                        v_params=torch.zeros(num_blocks, bs, heads, 2, dim // g, dtype=kivi.PARAM_DTYPE),
                        staging=torch.zeros(slots, 2, bs, heads, dim, dtype=kivi.stage_dtype(dtype)))


def copy_cache(kv: LayerKVCache) -> LayerKVCache:
    return LayerKVCache(kv.k.clone(), kv.v.clone(), k_params=kv.k_params.clone(), v_params=kv.v_params.clone(),
                        staging=kv.staging.clone())


@pytest.mark.parametrize("dim", [16, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_store_matches_pytorch(ext, dim, dtype, monkeypatch):
    torch.manual_seed(1)
    bs, heads = 4, 2
    kv = layer_cache(8, bs, heads, dim, 3, dtype)
    kv.k.random_(0, 256), kv.v.random_(0, 256)  # stale contents are overwritten
    # block 1 completed from staging (slot 2, its first two rows staged before), block 3 from its own
    # tokens, block 5 left partial (staged in slot 0); one skipped token
    slots = torch.tensor([6, 7, 12, 13, 14, 15, 20, -1])
    stage = torch.tensor([10, 11, -1, -1, -1, -1, 0, -1])
    kv.staging[2, :, :2] = torch.randn(2, 2, heads, dim).to(kv.staging.dtype)
    k, v = (torch.randn(8, heads, dim) * 3).to(dtype), torch.randn(8, heads, dim).to(dtype)
    ours = copy_cache(kv)
    kivi.store_kv(ours, k, v, slots, stage)
    monkeypatch.setattr(kivi, "load_cpu_extension", lambda: None)
    ref = copy_cache(kv)
    kivi.store_kv(ref, k, v, slots, stage)
    for a, b in zip((ours.k, ours.v, ours.k_params, ours.v_params, ours.staging),
                    (ref.k, ref.v, ref.k_params, ref.v_params, ref.staging)):
        assert torch.equal(a, b)
    assert torch.equal(ours.staging[0, 1, 0], v[6].to(kv.staging.dtype))
    assert torch.equal(ours.staging[0, 0, 0], k[6].to(kv.staging.dtype))


def oracle(q, k, v, bs, scale, positions):
    """Each query at ``positions`` over keys/values [0, p]: float16 ones in block 0 and its residual
    zone, elsewhere keys (rounded so) quantized per channel over their block and values per token
    (float64)."""
    n, heads, dim = k.shape
    full = n // bs * bs
    k16, v16 = k.half().float(), v.half().float()
    kq = kivi.dequantize_keys(*kivi.quantize_keys(k16[:full].unflatten(0, (-1, bs)))).flatten(0, 1)
    kq = torch.cat([kq, k16[full:]])  # (the partial block is in every zone that reaches it)
    vq = kivi.dequantize_values(*kivi.quantize_values(v))
    group = q.shape[1] // heads
    out = []
    for row, p in zip(q, positions):
        t = torch.arange(p + 1)[:, None, None]
        exact = (t < bs) | (t >= max(0, p // bs - kivi.residual_blocks(bs) + 1) * bs)
        keys = torch.where(exact, k16[:p + 1], kq[:p + 1]).double().repeat_interleave(group, 1)
        values = torch.where(exact, v16[:p + 1], vq[:p + 1]).double().repeat_interleave(group, 1)
        w = torch.einsum("hd,thd->ht", row.double(), keys) * scale
        out.append(torch.einsum("ht,thd->hd", w.softmax(-1), values))
    return torch.stack(out)


@pytest.fixture
def short_residual(monkeypatch):
    """A residual of 8 tokens, so that short sequences reach past it."""
    monkeypatch.setattr(kivi, "RESIDUAL", 8)


@pytest.mark.parametrize("dim", [16, 64])
def test_attention_matches_oracle(dim, short_residual, monkeypatch):
    monkeypatch.setattr(kivi, "load_cpu_extension", lambda: None)
    check_against_oracle(dim)


@pytest.mark.parametrize("dim", [16, 64])
def test_native_attention_matches_oracle(ext, dim, short_residual):
    check_against_oracle(dim)


def check_against_oracle(dim: int) -> None:
    """A sequence fed in steps of every kind (prompt chunks that start mid-block, decode steps,
    multi-token verifications crossing a block boundary) through the block manager's staging slots
    and the model runner's metadata."""
    torch.manual_seed(2)
    bs, heads, hq, scale = 4, 2, 4, 0.3
    steps = [6, 1, 1, 3, 9, 1, 2, 4, 1, 14, 3]
    total, residual = sum(steps), kivi.residual_blocks(bs)
    q, k, v = torch.randn(total, hq, dim), torch.randn(total, heads, dim) * 2, torch.randn(total, heads, dim)
    slots = 2 * residual + 1  # (the most one sequence needs)
    bm = BlockManager(16, bs, enable_prefix_caching=False, num_staging_slots=slots, residual_blocks=residual)
    runner = ModelRunner.__new__(ModelRunner)  # only its metadata builder
    runner.block_size, runner.device, runner.max_batched_query_len = bs, torch.device("cpu"), bs
    runner.kv_cache = SimpleNamespace(kivi=True, staging_slots=bm.staging.slots, residual_blocks=residual)
    kv = layer_cache(16, bs, heads, dim, slots)
    seq = Sequence(list(range(total)), SamplingParams())
    start = 0
    for n in steps:
        assert bm.allocate_slots(seq, n)
        meta = runner._group_metadata([seq], [n], [seq.block_table], [start])
        assert (meta.num_decode_tokens == n) == (n <= bs)
        out = kivi.forward(q[start:start + n], k[start:start + n], v[start:start + n], kv, meta, scale)
        want = oracle(q[start:start + n], k[:start + n], v[:start + n], bs, scale, range(start, start + n))
        torch.testing.assert_close(out.unflatten(1, (hq, dim)).double(), want, atol=2e-5, rtol=1e-4)
        bm.commit(seq, n)
        start += n
    bm.free(seq)
    assert bm.staging.num_available_slots == slots and bm.num_free_blocks == 16


def test_prefix_hits_and_cuts_need_their_zone_staged():
    """A long chunk stages block 0 and the zone it ends in; freed, those stay findable.  A prefix hit
    is kept only as far as the zone of its first computed token is staged, and a cut goes back
    until the zone of its next token is."""
    bs, residual = 4, 2

    def computed(n: int) -> tuple[BlockManager, Sequence]:
        bm = BlockManager(32, bs, num_staging_slots=2 * residual + 1, residual_blocks=residual)
        seq = Sequence(list(range(n)), SamplingParams())
        assert bm.allocate_slots(seq, n)
        bm.commit(seq, n)
        return bm, seq

    bm, a = computed(30)
    assert set(bm.staging.slots) == {a.block_table[i] for i in (0, 6, 7)}
    bm.truncate(a, 17)  # block 4's zone {0, 3} is not staged, nor those before: back to token 4
    assert a.num_computed_tokens == 4 and len(a.block_table) == 1
    bm, a = computed(30)
    bm.free(a)
    assert bm.staging.num_available_slots == 2 * residual + 1
    assert len(bm.get_computed_blocks(Sequence(list(range(30)) + [9], SamplingParams()))) == 7  # zone {0, 6}
    assert len(bm.get_computed_blocks(Sequence(list(range(22)) + [9] * 9, SamplingParams()))) == 1  # {0} only
    for n in (50, 3, 3):  # new sequences take every slot: a's idle ones are reclaimed, oldest first
        assert bm.allocate_slots(Sequence(list(range(100 * n, 101 * n)), SamplingParams()), n)
    assert bm.staging.num_available_slots == 0
    assert bm.get_computed_blocks(Sequence(list(range(30)) + [9], SamplingParams())) == []


# ---- the engine ------------------------------------------------------------------------------------


def assert_idle(engine):
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert bm.staging.num_available_slots == engine.runner.kv_cache.num_staging_slots


def greedy(llm: LLM, prompts, **kw) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, **kw)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_engine_batching_chunking_caching_preemption_forks(tiny_model, monkeypatch):
    path = str(tiny_model("llama_256"))  # head size 64: the kernels' vector decoders
    monkeypatch.setattr(kivi, "RESIDUAL", 32)  # two blocks: the prompts reach past them
    prompts = [list(range(4000 + 100 * i, 4000 + 100 * i + 37 + 11 * i)) for i in range(4)]
    llm = LLM(path, dtype="float32", kv_cache_memory="16MiB", kv_cache_dtype="kivi2")
    want = [greedy(llm, [p])[0] for p in prompts]  # one at a time
    assert greedy(llm, prompts) == want  # batched, and the prompts' blocks cached from the first run
    assert llm.engine.scheduler.prefix_hits > 0
    assert_idle(llm.engine)
    assert llm.engine.worker.kv_connector.send(prompts[0]) is None  # (its hits need staged rows)
    chunked = LLM(path, dtype="float32", kv_cache_memory="16MiB", kv_cache_dtype="kivi2", max_num_batched_tokens=23,
                  enable_prefix_caching=False)
    assert greedy(chunked, prompts) == want
    # 20 blocks for four sequences of up to 7 (and staging slots for all four): preempted and recomputed
    kv = chunked.engine.runner.kv_cache
    monkeypatch.setattr(kv_cache, "STAGING_SHARE", 1)
    small = LLM(path, dtype="float32", kv_cache_memory=20 * kv.bytes_per_block + 16 * kv.staging[:, 0].nbytes,
                kv_cache_dtype="kivi2", max_num_seqs=4, enable_prefix_caching=False)
    assert small.engine.runner.kv_cache.num_staging_slots == 16 and small.engine.runner.num_blocks == 20
    assert greedy(small, prompts) == want
    assert small.engine.scheduler.num_preemptions > 0
    assert_idle(small.engine)
    # n samples share the prompt's blocks (and the staged rows of its last ones)
    forked = llm.generate([prompts[1]], SamplingParams(n=3, temperature=0.0, max_tokens=40, ignore_eos=True),
                          use_tqdm=False)
    assert [c.token_ids for c in forked[0].outputs] == [want[1]] * 3
    assert_idle(llm.engine)


def test_engine_with_an_eviction_policy(tiny_model, monkeypatch):
    path = str(tiny_model("llama_256"))
    monkeypatch.setattr(kivi, "RESIDUAL", 32)
    prompts = [list(range(4000 + 100 * i, 4000 + 100 * i + 150)) for i in range(3)]
    llm = LLM(path, dtype="float32", kv_cache_memory="16MiB", kv_cache_dtype="kivi2")
    kw = {"kv_policy": "streaming", "kv_budget": 64}
    want = [greedy(llm, [p], **kw)[0] for p in prompts]
    assert greedy(llm, prompts, **kw) == want
    assert llm.engine.scheduler.num_evicted_blocks > 0
    assert_idle(llm.engine)


def test_bundled_model_bytes_logits_and_speculation(bundled_model_path):
    """A fourth of a bfloat16 cache's bytes or less, next-token distributions close to the float
    cache's over 600 tokens of prose (KL measured on the bundled model: mean 0.026, max 0.45 nats;
    the same top token at 94% of positions), and speculative decoding giving the tokens plain
    decoding gives."""
    flt = LLM(str(bundled_model_path), dtype="float32", kv_cache_memory="64MiB")
    two = LLM(str(bundled_model_path), dtype="float32", kv_cache_memory="64MiB", kv_cache_dtype="kivi2")
    kv = two.engine.runner.kv_cache
    assert flt.engine.runner.kv_cache.bytes_per_block / kv.bytes_per_block >= 8  # float32: 9.1x; bfloat16: 4.6x
    ids = flt.tokenizer.encode(corpus()[:3000])[:600]  # (past the residual zone of 128 tokens)
    chunks = [len(ids) - 24] + [1] * 24
    ref, ours = engine_logits(flt.engine, ids, chunks), engine_logits(two.engine, ids, chunks)
    lp, lq = ref.log_softmax(-1), ours.log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    assert kl.mean() <= 0.05 and kl.max() <= 1.0, kl
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    # speculative decoding (prompt lookup): drafts verified over staged rows, rejected ones rolled back
    spec = LLM(str(bundled_model_path), dtype="float32", kv_cache_memory="64MiB", kv_cache_dtype="kivi2",
               speculative="ngram")
    prompts = ["1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2, 3,",
               "The cat sat on the mat. The dog sat on the log. The cat sat on the mat. The dog"]
    assert greedy(spec, prompts) == [greedy(two, [p])[0] for p in prompts]
    assert 0 < spec.engine.spec.num_accepted_tokens < spec.engine.spec.num_draft_tokens  # some rolled back
    assert_idle(spec.engine)


def test_refused_where_it_does_not_run(tiny_model):
    with pytest.raises(ValueError, match="hybrid"):
        LLM(str(tiny_model("gemma3")), dtype="float32", kv_cache_memory="16MiB", kv_cache_dtype="kivi2")
