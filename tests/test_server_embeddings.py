"""Embeddings: ``LLM.embed`` and ``/v1/embeddings`` (through the official ``openai`` client) against
HF transformers' final hidden states (after the model's last norm) of the tiny random-weight Llama,
pooled the same way: the last token's or the mean, L2-normalized or not."""
from __future__ import annotations

import base64
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

from infera import LLM, PoolingParams, SamplingParams
from infera.engine.llm_engine import LLMEngine
from infera.engine.pooler import pool
from infera.engine.sequence import Sequence
from infera.server.options import ServerOptions
from test_security import serve
from test_server import MODEL, Server, server  # noqa: F401  (fixture)

TEXTS = ["The engine schedules every sequence in blocks",
         "Embeddings pool the final hidden states of a prompt; this one is long enough to span several chunks "
         "of prefill when the step budget is small, and several KV blocks."]


@pytest.fixture(scope="module")
def hf_model(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model("llama"), dtype=torch.float32).eval()


def hf_embedding(hf_model, ids: list[int], pooling_type: str = "LAST", normalize: bool = True) -> np.ndarray:
    with torch.no_grad():
        out = hf_model(torch.tensor([ids]), output_hidden_states=True)
    hidden = out.hidden_states[-1][0]  # the last layer's output after the final norm
    with torch.no_grad():
        assert torch.equal(hidden, hf_model.model(torch.tensor([ids])).last_hidden_state[0])
    vector = hidden[-1] if pooling_type == "LAST" else hidden.mean(dim=0)
    if normalize:
        vector = torch.nn.functional.normalize(vector, dim=-1)
    return vector.numpy()


@pytest.fixture(scope="module")
def chunked_llm(tiny_model) -> LLM:
    """Small steps (chunked prefill of the long prompt) and prefix caching."""
    return LLM(str(tiny_model("llama")), dtype="float32", kv_cache_memory="64MiB", max_num_batched_tokens=16,
               block_size=16)


@pytest.mark.parametrize("pooling_type", ["LAST", "MEAN"])
@pytest.mark.parametrize("normalize", [True, False])
def test_llm_embed_equals_hf_hidden_states(chunked_llm, hf_model, pooling_type, normalize):
    params = PoolingParams(pooling_type=pooling_type, normalize=normalize)
    ids = [chunked_llm.tokenizer.encode(t) for t in TEXTS]
    assert len(ids[1]) > 16  # computed in several steps
    for prompts in (TEXTS, ids, TEXTS):  # text, token ids, then again from the prefix cache
        outs = chunked_llm.embed(prompts, params, use_tqdm=False)
        assert [o.prompt_token_ids for o in outs] == ids
        for o, p in zip(outs, ids):
            expected = hf_embedding(hf_model, p, pooling_type, normalize)
            np.testing.assert_allclose(o.outputs.embedding, expected, rtol=1e-4, atol=1e-5)
            assert np.isclose(np.linalg.norm(o.outputs.embedding), 1.0) == normalize
    assert chunked_llm.engine.block_manager.num_free_blocks == chunked_llm.engine.block_manager.num_blocks


def test_embeddings_run_beside_generation(chunked_llm, hf_model):
    """Embedding and generation requests share steps; neither disturbs the other."""
    engine = chunked_llm.engine
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    [alone] = chunked_llm.generate(TEXTS[0], greedy, use_tqdm=False)
    gen = engine.add_request(TEXTS[0], greedy)
    emb = engine.add_request(TEXTS[1], PoolingParams())
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert done[gen].outputs[0].token_ids == alone.outputs[0].token_ids and done[gen].embedding is None
    assert done[emb].outputs[0].token_ids == [] and done[emb].num_generated_tokens == 0
    np.testing.assert_allclose(done[emb].embedding, hf_embedding(hf_model, engine.tokenizer.encode(TEXTS[1])),
                               rtol=1e-4, atol=1e-5)


def test_mean_pooling_across_chunks_and_a_recompute():
    """A preempted sequence computes its prompt again from the start: positions pooled before count once."""
    seq = Sequence(list(range(6)), SamplingParams())
    seq.pooling = PoolingParams("MEAN", normalize=False)
    hidden = torch.randn(6, 4)
    assert pool(seq, hidden[:4]) is None
    seq.num_computed_tokens = 0  # preempted after the first chunk
    assert pool(seq, hidden[:2]) is None
    seq.num_computed_tokens = 2
    torch.testing.assert_close(torch.tensor(pool(seq, hidden[2:])), hidden.mean(dim=0))


def test_pooling_params_validate():
    with pytest.raises(ValueError, match="pooling_type"):
        PoolingParams(pooling_type="CLS")
    assert PoolingParams.from_json('{"pooling_type": "MEAN", "normalize": false}') == PoolingParams("MEAN", False)
    for bad in ('{"pooling_type": "MAX"}', '{"softmax": true}', "MEAN"):
        with pytest.raises(ValueError):
            ServerOptions(pooler_config=bad)


def test_embeddings_endpoint(server, hf_model):
    client = server.client()
    ids = [server.tokenize(prompt=t) for t in TEXTS]
    floats = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    assert floats.object == "list" and floats.model == MODEL
    assert [d.index for d in floats.data] == [0, 1] and all(d.object == "embedding" for d in floats.data)
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == sum(map(len, ids))
    for d, p in zip(floats.data, ids):
        np.testing.assert_allclose(d.embedding, hf_embedding(hf_model, p), rtol=1e-4, atol=1e-5)
    expected = np.asarray([d.embedding for d in floats.data], dtype=np.float32)
    # (requests again may read the prompts' KV from the prefix cache: equal to float32 rounding)
    # the client's default is base64, which it decodes; the raw body holds little-endian float32
    np.testing.assert_allclose([d.embedding for d in client.embeddings.create(model=MODEL, input=TEXTS).data],
                               expected, rtol=1e-5, atol=1e-6)
    raw = httpx.post(f"{server.url}/v1/embeddings", json={"input": TEXTS, "encoding_format": "base64"}).json()
    decoded = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in raw["data"]]
    np.testing.assert_allclose(decoded, expected, rtol=1e-5, atol=1e-6)
    # token ids, one list or several, embed as their text does
    one = client.embeddings.create(model=MODEL, input=ids[0], encoding_format="float")
    np.testing.assert_allclose(one.data[0].embedding, expected[0], rtol=1e-5, atol=1e-6)
    both = client.embeddings.create(model=MODEL, input=ids, encoding_format="float")
    np.testing.assert_allclose([d.embedding for d in both.data], expected, rtol=1e-5, atol=1e-6)
    unnormalized = httpx.post(f"{server.url}/v1/embeddings", json={"input": ids[0], "normalize": False}).json()
    np.testing.assert_allclose(unnormalized["data"][0]["embedding"], hf_embedding(hf_model, ids[0], normalize=False),
                               rtol=1e-4, atol=1e-5)
    assert server.idle()


def test_embeddings_errors(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError, match="matryoshka") as e:
        client.embeddings.create(model=MODEL, input="x", dimensions=8)
    assert e.value.body["param"] == "dimensions"
    limit = server.engine.max_model_len
    with pytest.raises(openai.BadRequestError, match=f"context length is {limit}") as e:
        client.embeddings.create(model=MODEL, input=[5] * (limit + 1))
    assert e.value.body["code"] == "context_length_exceeded"
    assert len(client.embeddings.create(model=MODEL, input=[5] * limit).data[0].embedding) == 64  # no room needed
    for bad in ([], [[]], [1.5], [-1], {"text": "x"}, ["x"] * 257):
        response = httpx.post(f"{server.url}/v1/embeddings", json={"input": bad})
        assert response.status_code == 400 and response.json()["error"]["message"], bad
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="other", input="x")
    assert server.idle()


@pytest.fixture(scope="module")
def mean_server(tiny_model) -> Iterator[Server]:
    engine = LLMEngine(model=str(tiny_model("llama")), dtype="float32", kv_cache_memory="64MiB")
    with serve(engine, ServerOptions(pooler_config='{"pooling_type": "MEAN", "normalize": false}')) as (srv, _):
        yield srv


def test_pooler_config_flag(mean_server, hf_model):
    ids = mean_server.tokenize(prompt=TEXTS[1])
    out = mean_server.client().embeddings.create(model=MODEL, input=TEXTS[1], encoding_format="float")
    np.testing.assert_allclose(out.data[0].embedding, hf_embedding(hf_model, ids, "MEAN", normalize=False),
                               rtol=1e-4, atol=1e-5)
