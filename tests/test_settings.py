"""One settings schema: EngineConfig, ServerConfig and ServerOptions fields are the flags of the CLI."""
from __future__ import annotations

import argparse
import ast
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest

import infera.server
from infera.arg_utils import add_dataclass_args, dataclass_kwargs, option
from infera.cli import build_parser, engine_kwargs, main
from infera.config import EngineConfig
from infera.server.options import LOOPBACK_HOSTS, ServerConfig, ServerOptions, server_options

# a value unlike the default for every field, as flags and as the config holds it
ENGINE_VALUES = {
    "model": (["--model", "m.gguf"], "m.gguf"),
    "dtype": (["--dtype", "float16"], "float16"),
    "device": (["--device", "cuda:1"], "cuda:1"),
    "max_model_len": (["--max-model-len", "77"], 77),
    "max_num_seqs": (["--max-num-seqs", "3"], 3),
    "max_num_batched_tokens": (["--max-num-batched-tokens", "64"], 64),
    "block_size": (["--block-size", "32"], 32),
    "kv_cache_memory": (["--kv-cache-memory", "3MiB"], 3 * 2**20),
    "kv_cache_dtype": (["--kv-cache-dtype", "int8"], "int8"),
    "kv_policy": (["--kv-policy", "streaming"], "streaming"),
    "kv_budget": (["--kv-budget", "512"], 512),
    "kv_sink_tokens": (["--kv-sink-tokens", "8"], 8),
    "quantization": (["--quantization", "int4"], "int4"),
    "enable_prefix_caching": (["--no-enable-prefix-caching"], False),
    "kv_offloading_size": (["--kv-offloading-size", "2.5"], 2.5),
    "disable_hybrid_kv_cache_manager": (["--disable-hybrid-kv-cache-manager"], True),
    "seed": (["--seed", "7"], 7),
    "gpu_memory_utilization": (["--gpu-memory-utilization", "0.5"], 0.5),
    "enforce_eager": (["--enforce-eager"], True),
    "speculative": (["--speculative", "ngram"], "ngram"),
    "num_speculative_tokens": (["--num-speculative-tokens", "4"], 4),
    "speculative_draft_vocab_size": (["--speculative-draft-vocab-size", "0"], 0),
    "generation_config": (["--generation-config", "vllm"], "vllm"),
}
SERVER_VALUES = {
    "host": (["--host", "0.0.0.0"], "0.0.0.0"),
    "port": (["--port", "0"], 0),
    "served_model_name": (["--served-model-name", "tiny"], "tiny"),
    "max_waiting_requests": (["--max-waiting-requests", "2"], 2),
}
OPTION_VALUES = {
    "api_key": (["--api-key", "k"], "k"),
    "max_tokens_default": (["--max-tokens-default", "8"], 8),
    "max_tokens_limit": (["--max-tokens-limit", "64"], 64),
    "request_timeout": (["--request-timeout", "3"], 3.0),
    "max_request_body_bytes": (["--max-request-body-bytes", "1000"], 1000),
    "trust_request_chat_template": (["--trust-request-chat-template"], True),
    "chat_template_timeout": (["--chat-template-timeout", "1.5"], 1.5),
    "reward_models": (["--reward-model", "prm=/m/prm", "--reward-model", "orm=/m/orm"],
                      {"prm": "/m/prm", "orm": "/m/orm"}),
    "allowed_hosts": (["--allowed-hosts", "a.test", "b.test"], ("a.test", "b.test")),
    "shutdown_timeout": (["--shutdown-timeout", "2"], 2.0),
    "tool_call_parser": (["--tool-call-parser", "llama3_json"], "llama3_json"),
    "reasoning_parser": (["--reasoning-parser", "deepseek_r1"], "deepseek_r1"),
    "chat_template": (["--chat-template", "t.jinja"], "t.jinja"),
    "allowed_origins": (["--allowed-origins", "http://a.test", "http://b.test"], ("http://a.test", "http://b.test")),
    "allowed_methods": (["--allowed-methods", "GET", "POST"], ("GET", "POST")),
    "allowed_headers": (["--allowed-headers", "content-type"], ("content-type",)),
    "allow_credentials": (["--allow-credentials"], True),
    "pooler_config": (["--pooler-config", '{"pooling_type": "MEAN"}'], '{"pooling_type": "MEAN"}'),
}
ENGINE_COMMANDS = ("generate", "chat", "serve", "profile", "eval")


def parse(*argv: str) -> argparse.Namespace:
    prompt = ["x"] if argv[0] == "generate" else []
    return build_parser().parse_args([argv[0], *prompt, *argv[1:]])


def subparser(command: str) -> argparse.ArgumentParser:
    [sub] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices[command]


def group_dests(command: str, title: str) -> list[str]:
    [group] = [g for g in subparser(command)._action_groups if g.title == title]
    return [a.dest for a in group._group_actions]


def flags(values: dict) -> list[str]:
    return [arg for argv, _ in values.values() for arg in argv]


@pytest.mark.parametrize("cls, values", [(EngineConfig, ENGINE_VALUES), (ServerConfig, SERVER_VALUES),
                                         (ServerOptions, OPTION_VALUES)])
def test_the_tables_cover_every_field_with_a_value_unlike_its_default(cls, values):
    defaults = cls()
    assert list(values) == [f.name for f in dataclasses.fields(cls)]
    for name, (_, value) in values.items():
        assert getattr(defaults, name) != value, name


@pytest.mark.parametrize("command", ENGINE_COMMANDS)
def test_the_engine_flags_are_the_engine_config_fields(command):
    # derived from the fields: a new EngineConfig field is a new flag, with no other edit
    assert group_dests(command, "model and engine") == [f.name for f in dataclasses.fields(EngineConfig)]


def test_the_server_flags_are_the_server_fields():
    assert group_dests("serve", "server") == [f.name for f in dataclasses.fields(ServerConfig)]
    assert group_dests("serve", "keys, request limits and trust") == [f.name for f in dataclasses.fields(ServerOptions)]


@pytest.mark.parametrize("command", ENGINE_COMMANDS)
def test_engine_flags_round_trip(command):
    config = EngineConfig(**engine_kwargs(parse(command, *flags(ENGINE_VALUES))))
    assert {name: getattr(config, name) for name in ENGINE_VALUES} == {n: v for n, (_, v) in ENGINE_VALUES.items()}
    assert EngineConfig(**engine_kwargs(parse(command))) == EngineConfig()


def test_server_flags_round_trip(monkeypatch):
    monkeypatch.delenv("INFERA_API_KEY", raising=False)
    args = parse("serve", *flags(SERVER_VALUES), *flags(OPTION_VALUES))
    assert ServerConfig(**dataclass_kwargs(ServerConfig, args)) == ServerConfig(
        **{n: v for n, (_, v) in SERVER_VALUES.items()})
    assert server_options(args) == ServerOptions(**{n: v for n, (_, v) in OPTION_VALUES.items()})
    args = parse("serve")
    assert ServerConfig(**dataclass_kwargs(ServerConfig, args)) == ServerConfig()
    assert server_options(args) == ServerOptions()


def test_vllm_aliases():
    assert not engine_kwargs(parse("serve", "--no-prefix-caching"))["enable_prefix_caching"]
    assert engine_kwargs(parse("generate", "--no-prefix-caching", "--enable-prefix-caching"))["enable_prefix_caching"]
    assert EngineConfig(**engine_kwargs(parse("serve", "--kv-cache-memory-bytes", "1048576"))).kv_cache_memory == 2**20
    assert engine_kwargs(parse("chat", "-m", "a.gguf"))["model"] == "a.gguf"
    assert engine_kwargs(parse("serve", "a.gguf", "--port", "0"))["model"] == "a.gguf"  # vllm serve MODEL
    assert engine_kwargs(parse("serve", "--port", "0", "a.gguf"))["model"] == "a.gguf"
    assert engine_kwargs(parse("serve", "--model", "b.gguf"))["model"] == "b.gguf"
    with pytest.raises(SystemExit):
        parse("serve", "--dtype", "float64")  # choices come from the field


def test_server_flags_that_are_not_their_field(monkeypatch):
    monkeypatch.delenv("INFERA_API_KEY", raising=False)
    assert server_options(parse("serve", "--request-timeout", "0")).request_timeout is None
    assert server_options(parse("serve")).allowed_hosts == LOOPBACK_HOSTS
    assert server_options(parse("serve", "--host", "0.0.0.0")).allowed_hosts is None
    assert server_options(parse("serve", "--api-key", "k")).allowed_hosts is None
    assert server_options(parse("serve", "--allowed-hosts", "*")).allowed_hosts is None
    with pytest.raises(ValueError, match="NAME=PATH"):
        server_options(parse("serve", "--reward-model", "prm"))
    # vLLM spells the CORS lists as JSON
    cors = server_options(parse("serve", "--allowed-origins", '["http://a.test"]', "--allowed-methods", '["GET"]'))
    assert (cors.allowed_origins, cors.allowed_methods, cors.allowed_headers) == (("http://a.test",), ("GET",), ("*",))
    with pytest.raises(ValueError, match="JSON list"):
        server_options(parse("serve", "--allowed-origins", "[1]"))
    monkeypatch.setenv("INFERA_API_KEY", "from-env")
    options = server_options(parse("serve"))
    assert options.api_key == "from-env" and options.allowed_hosts is None
    assert server_options(parse("serve", "--api-key", "flag")).api_key == "flag"


def test_server_config_checks_its_values():
    with pytest.raises(ValueError, match="--port"):
        ServerConfig(port=70000)
    with pytest.raises(ValueError, match="--max-waiting-requests"):
        ServerConfig(max_waiting_requests=0)


def test_serve_help_lists_every_flag_with_its_help(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "10000")  # no wrapping
    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cls in (EngineConfig, ServerConfig, ServerOptions):
        for f in dataclasses.fields(cls):
            assert f.metadata["help"] in out, f.name
    for flag in ("--max-num-seqs", "--no-prefix-caching", "--enable-prefix-caching", "--no-enable-prefix-caching",
                 "--kv-cache-memory-bytes", "--reward-model NAME=PATH", "--allowed-hosts HOST", "--api-key",
                 "--log-level", "--host", "--served-model-name", "-m MODEL"):
        assert flag in out, flag


def test_the_server_package_does_not_import_the_cli():
    for path in Path(infera.server.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "infera.cli" or n.startswith("infera.cli.") for n in names), path


@dataclass
class Toy:
    size: int = option(1, help="a size")
    ratio: float | None = option(None, help="a ratio")
    fast: bool = option(False, help="go fast")
    memory: int | str | None = option(None, flags=("--memory", "--mem"), help="bytes or a size")
    mode: str = option("a", choices=("a", "b"), help="a mode")
    names: list[str] = option(default_factory=list, nargs="*", help="names")
    pairs: dict[str, str] = option(default_factory=dict, flags=("--pair",), flag_default=None, action="append",
                                   help="NAME=VALUE (converted by the caller)")


def test_add_dataclass_args_derives_flags_from_fields():
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, Toy)
    args = parser.parse_args(["--size", "3", "--ratio", "0.5", "--fast", "--mem", "2GiB", "--mode", "b",
                              "--names", "x", "y", "--pair", "k=v"])
    assert dataclass_kwargs(Toy, args) == dict(size=3, ratio=0.5, fast=True, memory="2GiB", mode="b",
                                               names=["x", "y"], pairs=["k=v"])
    defaults = parser.parse_args([])
    assert dataclass_kwargs(Toy, defaults) == {**dataclasses.asdict(Toy()), "pairs": None}
    assert not parser.parse_args(["--fast", "--no-fast"]).fast
    for bad in (["--size", "x"], ["--ratio", "y"], ["--mode", "c"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
