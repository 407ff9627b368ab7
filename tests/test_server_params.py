"""Request parameters and server conventions through the official ``openai`` client against a real
server: ``logit_bias`` (with n-gram speculation on, and under a grammar), ``structured_outputs``,
unknown fields, sampling defaults from the model's generation config, ``--chat-template``, CORS and
``continuous_usage_stats``.  Engine-level checks of ``logit_bias`` run through ``LLM.generate``."""
from __future__ import annotations

import asyncio
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from infera import LLM, SamplingParams
from infera.engine.llm_engine import LLMEngine
from infera.loader.errors import ModelLoadError
from infera.loader.generation_config import gguf_sampling_defaults
from infera.server.chat_template import load_chat_template
from infera.server.options import ServerOptions
from infera.server.protocol import ChatCompletionRequest
from test_security import serve
from test_server import CHAT, MODEL, NO_EOS, PROMPT, Server, server  # noqa: F401  (fixture)
from test_spec import always_draft, draft_path, make_spec_llm, spec_counts  # noqa: F401  (fixture)

GENERATION_CONFIG = {"bos_token_id": 1, "eos_token_id": 2, "temperature": 0.0, "top_p": 0.9, "top_k": 7,
                     "max_new_tokens": 6, "do_sample": True}
TEMPLATE = ("{% for m in messages %}<<{{ m.role }}>>{{ m.content }}{% endfor %}"
            "{% if add_generation_prompt %}=>{% endif %}{% if mood is defined %}[{{ mood }}]{% endif %}")
ORIGIN = "http://app.example"
PROMPTS = ["The engine schedules every sequence", "Caches hold the keys and values", "A grammar masks tokens"]


@pytest.fixture(scope="module")
def model_dir(tiny_model, tmp_path_factory) -> Path:
    """The tiny Llama with sampling defaults in its generation_config.json."""
    path = tmp_path_factory.mktemp("params") / "llama-generation-config"
    shutil.copytree(tiny_model("llama"), path)
    (path / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    return path


@pytest.fixture(scope="module")
def configured(model_dir, tmp_path_factory) -> Iterator[Server]:
    """A server over ``model_dir`` with n-gram speculation (drafting whenever it may), a chat template
    file and CORS for one origin."""
    template = tmp_path_factory.mktemp("template") / "chat.jinja"
    template.write_text(TEMPLATE)
    engine = LLMEngine(model=str(model_dir), dtype="float32", kv_cache_memory="64MiB", speculative="ngram",
                       num_speculative_tokens=4)
    always_draft(engine)
    options = ServerOptions(chat_template=str(template), allowed_origins=(ORIGIN,), allow_credentials=True)
    with serve(engine, options) as (srv, _):
        yield srv


def completion_ids(srv: Server, prompt: str, max_tokens: int = 12, **extra) -> list[int]:
    out = srv.client().completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                          extra_body={**NO_EOS, "return_token_ids": True, **extra})
    return out.choices[0].model_extra["token_ids"]


def concurrently(srv: Server, bodies: list[dict]) -> list[list[int]]:
    """The greedy token ids of completion requests sent at once (so the engine batches them)."""
    async def one(client: openai.AsyncOpenAI, body: dict) -> list[int]:
        out = await client.completions.create(model=MODEL, max_tokens=12, temperature=0,
                                              extra_body={**NO_EOS, "return_token_ids": True,
                                                          **body.get("extra", {})}, prompt=body["prompt"])
        return out.choices[0].model_extra["token_ids"]

    async def run() -> list[list[int]]:
        async with srv.async_client() as client:
            return await asyncio.gather(*(one(client, b) for b in bodies))

    return asyncio.run(run())


def first_token(srv: Server, text: str) -> int:
    return srv.tokenize(prompt=text, add_special_tokens=False)[0]


# -- logit_bias -----------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["plain", "speculative"])
def test_logit_bias_forces_a_token_only_in_its_rows(server, configured, which):
    srv = server if which == "plain" else configured
    forced = first_token(srv, " cache")
    alone = [completion_ids(srv, p) for p in PROMPTS]
    assert all(forced not in ids for ids in alone)  # the bias, not the model, writes it below
    before = spec_counts(srv.engine) if which == "speculative" else None
    bodies = [{"prompt": PROMPTS[0], "extra": {"logit_bias": {str(forced): 100}}}] + [{"prompt": p}
                                                                                    for p in PROMPTS[1:]]
    biased, *others = concurrently(srv, bodies)
    assert biased == [forced] * 12
    assert others == alone[1:]
    if before is not None:  # the forced repeats were drafted by n-grams and accepted in verification
        drafted, accepted = (a - b for a, b in zip(spec_counts(srv.engine), before))
        assert drafted > 0 and accepted > 0


def test_logit_bias_bans_a_token_and_speculation_keeps_greedy_output(server, configured):
    greedy = completion_ids(server, PROMPTS[1])
    banned = greedy[0]
    bias = {str(banned): -100}
    out = completion_ids(server, PROMPTS[1], logit_bias=bias)
    assert banned not in out
    assert completion_ids(configured, PROMPTS[1], logit_bias=bias) == out  # token-identical with n-gram drafts
    chat = server.client().chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0,
                                                   logit_bias={str(banned): -100},
                                                   extra_body={**NO_EOS, "return_token_ids": True})
    assert banned not in chat.choices[0].model_extra["token_ids"]


def test_logit_bias_is_clamped(server):
    """Two tokens biased +100 and +1000: clamped to +100 both, the one the model prefers wins."""
    greedy = completion_ids(server, PROMPTS[2], max_tokens=1)[0]
    other = first_token(server, " cache")
    assert completion_ids(server, PROMPTS[2], max_tokens=1, logit_bias={str(greedy): 100, str(other): 1000}) == [greedy]
    assert completion_ids(server, PROMPTS[2], max_tokens=1, logit_bias={str(other): 1000}) == [other]
    assert SamplingParams(logit_bias={5: 1e6, 6: -250, 7: 3}).logit_bias == {5: 100.0, 6: -100.0, 7: 3.0}


def test_logit_bias_under_a_grammar(server):
    """The bias applies before the grammar's mask: it chooses among what the grammar allows, and a
    token the grammar forbids stays forbidden however it is biased."""
    client = server.client()
    choices = ["yes", "no"]
    for word in choices:
        out = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, temperature=0,
                                             logit_bias={str(first_token(server, word)): 100},
                                             extra_body={"structured_outputs": {"choice": choices}})
        assert out.choices[0].message.content == word
    outside = first_token(server, " cache")
    out = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, temperature=0,
                                         logit_bias={str(outside): 100}, extra_body={"guided_choice": choices})
    assert out.choices[0].message.content in choices


@pytest.mark.parametrize("bias,param", [({"x": 1}, "logit_bias"), ({"-3": 1}, "logit_bias"),
                                        ({"99999999": 1}, "logit_bias"), ({"1.5": 1}, "logit_bias"),
                                        ({"5": "much"}, "logit_bias.5")])
def test_bad_logit_bias_is_a_400_naming_it(server, bias, param):
    for path, body in (("/v1/completions", {"prompt": PROMPT}), ("/v1/chat/completions", {"messages": CHAT})):
        r = httpx.post(f"{server.url}{path}", json={**body, "max_tokens": 2, "logit_bias": bias})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_logit_bias_in_llm_generate_with_speculation(tiny_model, tiny_llm, draft_path, method):  # noqa: F811
    """Greedy outputs with a bias are token-identical with and without speculation; a sampled request
    forced by +100 writes only the forced token, its drafts verified against biased target probabilities."""
    llm = make_spec_llm(tiny_model, draft_path, method)
    forced = tiny_llm.tokenizer.encode(" cache", add_special_tokens=False)[0]
    prompt = "Speculative decoding verifies drafts"
    plain = tiny_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    banned = plain[0].outputs[0].token_ids[0]
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logit_bias={banned: -100})
    [want], [got] = (m.generate(prompt, greedy, use_tqdm=False) for m in (tiny_llm, llm))
    assert got.outputs[0].token_ids == want.outputs[0].token_ids and banned not in want.outputs[0].token_ids
    before = spec_counts(llm.engine)
    sampled = SamplingParams(temperature=1.0, seed=3, max_tokens=16, ignore_eos=True, logit_bias={forced: 100})
    assert llm.generate(prompt, sampled, use_tqdm=False)[0].outputs[0].token_ids == [forced] * 16
    drafted, accepted = (a - b for a, b in zip(spec_counts(llm.engine), before))
    assert drafted > 0 and accepted > 0


def test_logit_bias_out_of_vocabulary_in_llm(tiny_llm):
    with pytest.raises(ValueError, match="logit_bias"):
        tiny_llm.generate("x", SamplingParams(logit_bias={10**9: 1.0}), use_tqdm=False)
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={"5": 1.0})
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={5: float("nan")})


# -- structured_outputs -----------------------------------------------------------------------------
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
          "additionalProperties": False}


@pytest.mark.parametrize("key,value", [("choice", ["red", "green", "blue"]), ("regex", "[a-c]{3}"),
                                       ("json", SCHEMA), ("grammar", 'root ::= "x" | "yz"')])
def test_structured_outputs_equal_guided(server, key, value):
    client = server.client()

    def text(**extra) -> str:
        return client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                                         extra_body=extra).choices[0].text

    assert text(structured_outputs={key: value}) == text(**{f"guided_{key}": value})
    assert ChatCompletionRequest(messages=CHAT, structured_outputs={key: value}).structured() == \
        ChatCompletionRequest(messages=CHAT, **{f"guided_{key}": value}).structured()


def test_structured_outputs_json_object(server):
    out = server.client().chat.completions.create(model=MODEL, messages=CHAT, max_tokens=30, temperature=0,
                                                  extra_body={"structured_outputs": {"json_object": True}})
    assert out.choices[0].message.content.lstrip().startswith("{")
    assert ChatCompletionRequest(messages=CHAT, structured_outputs={"json_object": True}).structured().json_object


@pytest.mark.parametrize("extra,param", [
    ({"structured_outputs": {"regex": "a+"}, "guided_regex": "b+"}, "structured_outputs"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"choice": ["a"]}}, "response_format"),
    ({"structured_outputs": {"regex": "a+", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "(["}}, "structured_outputs"),
])
def test_structured_outputs_conflicts_are_400s(server, extra, param):
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": CHAT, "max_tokens": 3, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_kv_policy_per_request(server):
    """A request's own KV policy: full budget = the same tokens; bad settings are 400s naming them."""
    prompt = " ".join([PROMPT] * 12)
    plain = completion_ids(server, prompt, max_tokens=24)
    assert completion_ids(server, prompt, max_tokens=24, kv_policy="streaming", kv_budget=1.0) == plain
    assert len(completion_ids(server, prompt, max_tokens=24, kv_policy="streaming", kv_budget=32,
                              kv_sink_tokens=4)) == 24
    for extra, param in (({"kv_policy": "h2o"}, "kv_policy"), ({"kv_budget": 0}, "kv_budget"),
                         ({"kv_policy": "streaming", "kv_budget": 2.5}, "kv_budget"),
                         ({"kv_sink_tokens": -1}, "kv_sink_tokens")):
        r = httpx.post(f"{server.url}/v1/completions", json={"prompt": prompt, "max_tokens": 2, **extra})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param, r.text
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": prompt, "max_tokens": 2, "kv_policy": "streaming"})
    assert r.status_code == 400 and "needs a kv_budget" in r.json()["error"]["message"], r.text


# -- unknown fields -------------------------------------------------------------------------------
def test_unknown_fields_are_logged_once_and_ignored(server, caplog):
    client = server.client()
    body = {"unknown_knob": 3, "stream_options_typo": True, "structured_outputs": {"choice": ["a", "b"],
                                                                                    "disable_any_whitespace": True}}
    with caplog.at_level(logging.WARNING, logger="infera.server"):
        for _ in range(2):
            out = client.chat.completions.create(model=MODEL, max_tokens=3,
                                                 messages=[{"role": "user", "content": "hi", "mood": "curious"}],
                                                 extra_body=body)
            assert out.choices[0].message.content in ("a", "b")
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, extra_body={"unknown_knob": 1})
    lines = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert len(lines) == 2, lines  # the second chat request logs nothing new
    chat, completion = lines
    assert "/v1/chat/completions" in chat and "/v1/completions" in completion and "'unknown_knob'" in completion
    for name in ("unknown_knob", "stream_options_typo", "structured_outputs.disable_any_whitespace",
                 "messages[].mood"):
        assert f"'{name}'" in chat


# -- sampling defaults from the generation config ----------------------------------------------------
def test_generation_config_defaults_and_overrides(server, configured):
    assert configured.engine.default_sampling_params == {"temperature": 0.0, "top_p": 0.9, "top_k": 7,
                                                         "max_tokens": 6}
    client = configured.client()
    greedy = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=6,
                                            extra_body=NO_EOS).choices[0].message.content
    for seed in (1, 2):  # temperature 0 from the generation config, 6 tokens from max_new_tokens
        out = client.chat.completions.create(model=MODEL, messages=CHAT, seed=seed, extra_body=NO_EOS)
        assert out.choices[0].message.content == greedy and out.usage.completion_tokens == 6
    # a request's values override the defaults: the same as a server without them (same weights)
    given = {"temperature": 1.0, "top_p": 1.0, "seed": 5, "max_tokens": 8, "prompt": PROMPT, "model": MODEL}
    sampled = configured.client().completions.create(**given, extra_body={**NO_EOS, "top_k": 0})
    assert sampled.choices[0].text == server.client().completions.create(**given, extra_body=NO_EOS).choices[0].text
    assert server.engine.default_sampling_params == {}  # save_pretrained's file holds no sampling keys


def test_generation_config_setting(model_dir, tmp_path):
    llm = LLM(str(model_dir), dtype="float32", kv_cache_memory="16MiB")  # auto: greedy, 6 tokens
    [default] = llm.generate(PROMPT, use_tqdm=False)
    [greedy] = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    assert default.outputs[0].token_ids == greedy.outputs[0].token_ids and len(greedy.outputs[0].token_ids) == 6
    assert LLM(str(model_dir), dtype="float32", kv_cache_memory="16MiB",
               generation_config="vllm").engine.default_sampling_params == {}
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.5, "repetition_penalty": 1.1}))
    llm = LLM(str(model_dir), dtype="float32", kv_cache_memory="16MiB", generation_config=str(tmp_path))
    assert llm.engine.default_sampling_params == {"temperature": 0.5, "repetition_penalty": 1.1}
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_p": 0.0}))
    with pytest.raises(ModelLoadError, match="top_p"):
        LLM(str(model_dir), dtype="float32", kv_cache_memory="16MiB", generation_config=str(tmp_path))
    with pytest.raises(ModelLoadError, match="generation-config"):
        LLM(str(model_dir), dtype="float32", kv_cache_memory="16MiB", generation_config=str(tmp_path / "none"))


def test_gguf_sampling_metadata():
    fields = {"general.sampling.temp": 0.699999988079071, "general.sampling.top_k": 20,
              "general.sampling.penalty_repeat": None, "general.sampling.min_p": 0.05000000074505806}
    assert gguf_sampling_defaults(fields) == {"temperature": 0.7, "top_k": 20, "min_p": 0.05}


# -- chat template, CORS, continuous usage ------------------------------------------------------------
def test_chat_template_option(server, configured):
    ids = configured.tokenize(messages=[{"role": "user", "content": "hi"}])
    assert ids == configured.tokenize(prompt="<<user>>hi=>", add_special_tokens=False)
    assert server.tokenize(messages=[{"role": "user", "content": "hi"}]) != ids  # the model's own template
    out = configured.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                      max_tokens=2)
    assert out.usage.prompt_tokens == len(ids)
    with_kwargs = configured.client().chat.completions.create(  # chat_template_kwargs reach the file's template
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
        extra_body={"chat_template_kwargs": {"mood": "calm"}, "return_token_ids": True})
    assert with_kwargs.model_extra["prompt_token_ids"] == configured.tokenize(prompt="<<user>>hi=>[calm]",
                                                                              add_special_tokens=False)


def test_load_chat_template(tmp_path):
    (tmp_path / "t.jinja").write_text(TEMPLATE)
    assert load_chat_template(str(tmp_path / "t.jinja")) == TEMPLATE
    assert load_chat_template("{{ messages[0].content }}\\n") == "{{ messages[0].content }}\n"
    assert load_chat_template(None) is None
    with pytest.raises(ValueError, match="looks like a file path"):
        load_chat_template(str(tmp_path / "missing.jinja"))


def test_cors_headers_only_when_configured(server, configured):
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    r = httpx.options(f"{configured.url}/v1/chat/completions", headers=preflight)
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert r.headers["access-control-allow-credentials"] == "true"
    assert "POST" in r.headers["access-control-allow-methods"]
    assert httpx.get(f"{configured.url}/v1/models", headers={"Origin": ORIGIN}).headers[
        "access-control-allow-origin"] == ORIGIN
    other = httpx.options(f"{configured.url}/v1/chat/completions", headers={**preflight, "Origin": "http://evil"})
    assert "access-control-allow-origin" not in other.headers
    for r in (httpx.options(f"{server.url}/v1/chat/completions", headers=preflight),
              httpx.get(f"{server.url}/v1/models", headers={"Origin": ORIGIN})):
        assert not any(h.startswith("access-control-") for h in r.headers)


def test_continuous_usage_stats(server):
    client = server.client()
    options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, stream=True,
                                                 stream_options=options, extra_body=NO_EOS))
    assert all(c.usage is not None for c in chunks)
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == sorted(counts) and counts[0] == 0 and counts[-1] == 6
    assert {c.usage.prompt_tokens for c in chunks} == {len(server.tokenize(messages=CHAT))}
    assert all(c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens for c in chunks)
    text = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, stream=True,
                                          stream_options=options, extra_body=NO_EOS))
    assert all(c.usage is not None for c in text) and [c.usage.completion_tokens for c in text][-1] == 5
    plain = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, stream=True,
                                           stream_options={"include_usage": True}, extra_body=NO_EOS))
    assert [c.usage is not None for c in plain] == [False] * (len(plain) - 1) + [True]
