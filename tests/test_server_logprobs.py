"""Log-likelihoods over the API, as lm-evaluation-harness reads them: ``echo`` with ``logprobs`` on
/v1/completions (``max_tokens`` 0 included) and vLLM's ``prompt_logprobs``, through the official
``openai`` client against a real server on the tiny fp32 Llama.  The values must be the engine's
(``LLM.generate`` with ``prompt_logprobs``) and HF transformers' log-softmax on the same weights."""
from __future__ import annotations

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoModelForCausalLM

from infera import SamplingParams
from test_server import MODEL, NO_EOS, PROMPT, server  # noqa: F401  (fixture)

TOL = 1e-4  # float32 on both sides


@pytest.fixture(scope="module")
def hf_logprobs(tiny_model):
    """``hf_logprobs(ids)`` -> [len(ids), V]: HF's log-softmax after each token."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model("llama"), dtype=torch.float32)

    def run(ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return run


def echo(server, prompt, max_tokens: int, logprobs: int, **kw):
    return server.client().completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                              logprobs=logprobs, echo=True, extra_body=NO_EOS, **kw)


def assert_offsets_match(text: str, lp) -> None:
    """Every token's text sits at its offset in the returned text, the offsets in order."""
    assert lp.text_offset == sorted(lp.text_offset)
    for token, offset in zip(lp.tokens, lp.text_offset):
        assert text[offset:offset + len(token)] == token


def test_echo_logprobs_are_the_engines_and_hfs(server, tiny_llm, hf_logprobs):
    k = 3
    out = echo(server, PROMPT, 4, k)
    plain = server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=k,
                                               extra_body=NO_EOS).choices[0]
    choice, lp = out.choices[0], out.choices[0].logprobs
    assert choice.text == PROMPT + plain.text
    ids = tiny_llm.tokenizer.encode(PROMPT)
    n = len(ids)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n + 4
    assert lp.tokens[:n] == [tiny_llm.tokenizer.decode([t]) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing precedes the first token
    # the generated part is what a request without echo gets, its offsets moved past the prompt
    assert lp.tokens[n:] == plain.logprobs.tokens and lp.token_logprobs[n:] == plain.logprobs.token_logprobs
    assert lp.text_offset[n:] == [len(PROMPT) + o for o in plain.logprobs.text_offset]
    assert_offsets_match(choice.text, lp)

    engine = tiny_llm.generate([PROMPT], SamplingParams(max_tokens=1, prompt_logprobs=k), use_tqdm=False)[0]
    gen = tiny_llm.tokenizer.encode(plain.text, add_special_tokens=False)
    ref = hf_logprobs(ids + gen)
    for j in range(1, n):
        assert lp.token_logprobs[j] == pytest.approx(engine.prompt_logprobs[j].logprob, abs=TOL)
        assert lp.token_logprobs[j] == pytest.approx(ref[j - 1, ids[j]].item(), abs=TOL)
        top = ref[j - 1].topk(k)
        expected = {tiny_llm.tokenizer.decode([t]): v for t, v in zip(top.indices.tolist(), top.values.tolist())}
        expected[lp.tokens[j]] = ref[j - 1, ids[j]].item()  # the token itself is among them, as in OpenAI's
        assert lp.top_logprobs[j].keys() == expected.keys()
        assert all(lp.top_logprobs[j][t] == pytest.approx(v, abs=TOL) for t, v in expected.items())
    for j, value in enumerate(lp.token_logprobs[n:]):  # greedy: the top token after each position
        assert value == pytest.approx(ref[n - 1 + j].max().item(), abs=TOL)


def finished_by_length(server) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == "infera:request_success_total" and s.labels.get("finished_reason") == "length")


def test_max_tokens_0_scores_the_prompt_only(server, tiny_llm):
    ids = tiny_llm.tokenizer.encode(PROMPT)
    before = finished_by_length(server)
    out = echo(server, PROMPT, 0, 2)
    assert finished_by_length(server) == before + 1  # counted as finished, with no token
    choice = out.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert out.usage.completion_tokens == 0 and out.usage.prompt_tokens == len(ids)
    assert len(choice.logprobs.tokens) == len(ids)
    assert_offsets_match(choice.text, choice.logprobs)
    longer = echo(server, PROMPT, 3, 2).choices[0].logprobs
    assert choice.logprobs.token_logprobs == longer.token_logprobs[:len(ids)]
    assert choice.logprobs.top_logprobs == longer.top_logprobs[:len(ids)]
    # without echo there is nothing to return: a 400, as vLLM answers
    with pytest.raises(openai.BadRequestError) as e:
        server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=0)
    assert e.value.body["param"] == "max_tokens"


def test_lm_eval_request_token_id_prompts(server, tiny_llm):
    """lm-evaluation-harness's log-likelihood request: token-id prompts, echo, logprobs 1, max_tokens 1."""
    prompts = [tiny_llm.tokenizer.encode(t, add_special_tokens=False)
               for t in ("The cache holds", "Blocks are shared between sequences of one request")]
    out = echo(server, prompts, 1, 1)
    assert [c.index for c in out.choices] == [0, 1]
    for c, ids in zip(out.choices, prompts):
        assert c.text.startswith(tiny_llm.tokenizer.decode(ids))
        assert len(c.logprobs.token_logprobs) == len(ids) + 1
        assert_offsets_match(c.text, c.logprobs)
        alone = echo(server, ids, 0, 1).choices[0]
        assert alone.logprobs.token_logprobs == pytest.approx(c.logprobs.token_logprobs[:len(ids)], abs=TOL)


def test_offsets_with_text_the_tokens_split(server):
    """Characters split across tokens (their tokens' text alone is not in the prompt): the offsets
    still point into the prompt, in order, and the plain tokens sit where they say."""
    prompt = "Caf\u00e9 cr\u00e8me, \u2603 and \U0001F680 rockets"
    choice = echo(server, prompt, 2, 1).choices[0]
    lp = choice.logprobs
    assert choice.text.startswith(prompt)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[-1] < len(choice.text)
    plain = [(t, o) for t, o in zip(lp.tokens, lp.text_offset) if t.isascii()]
    assert len(plain) > 3 and all(choice.text[o:o + len(t)] == t for t, o in plain)


@pytest.mark.parametrize("max_tokens", [0, 5])
def test_echo_stream_equals_non_stream(server, max_tokens):
    full = echo(server, PROMPT, max_tokens, 2, n=2)
    chunks = list(echo(server, PROMPT, max_tokens, 2, n=2, stream=True))
    for index in (0, 1):
        parts = [c for chunk in chunks for c in chunk.choices if c.index == index]
        assert parts[0].text.startswith(PROMPT)  # the prompt comes first, in one piece
        expected = next(c for c in full.choices if c.index == index)
        assert "".join(p.text for p in parts) == expected.text
        for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            assert [x for p in parts for x in getattr(p.logprobs, field)] == getattr(expected.logprobs, field)
        assert parts[-1].finish_reason == "length"


def test_prompt_logprobs_as_vllm_returns_them(server, tiny_llm):
    ids = tiny_llm.tokenizer.encode(PROMPT)
    engine = tiny_llm.generate([PROMPT], SamplingParams(max_tokens=1, prompt_logprobs=2), use_tqdm=False)[0]
    out = server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=2,
                                             extra_body={"prompt_logprobs": 2})
    entries = out.choices[0].model_extra["prompt_logprobs"]
    assert len(entries) == len(ids) and entries[0] is None
    for j in range(1, len(ids)):
        e, expected = entries[j], engine.prompt_logprobs[j]
        assert list(e)[0] == str(ids[j])  # the prompt token first, then the top 2 (vLLM's order)
        assert {int(t) for t in e} == {ids[j], *(t for t, _ in expected.top)}
        for token_id, logprob, rank in [(ids[j], expected.logprob, expected.rank),
                                        *((t, v, r) for r, (t, v) in enumerate(expected.top, 1))]:
            entry = e[str(token_id)]
            assert entry["logprob"] == pytest.approx(logprob, abs=TOL) and entry["rank"] == rank
            assert entry["decoded_token"] == tiny_llm.tokenizer.decode([token_id])
    chat = server.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=1, extra_body={"prompt_logprobs": 0})
    entries = chat.model_extra["prompt_logprobs"]
    assert len(entries) == chat.usage.prompt_tokens and entries[0] is None
    assert all(len(e) == 1 and next(iter(e.values()))["logprob"] <= 0 for e in entries[1:])


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": "hi", "prompt_logprobs": 21}, "prompt_logprobs"),
    ("/v1/completions", {"prompt": "hi", "prompt_logprobs": 1, "stream": True}, None),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -1, "echo": True}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "prompt_logprobs": 1,
                              "stream": True}, None),
])
def test_bad_log_likelihood_requests(server, path, body, param):
    r = httpx.post(f"{server.url}{path}", json=body)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
