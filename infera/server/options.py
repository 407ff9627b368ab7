"""What the operator decides for ``infera serve``: where it listens, and the keys, limits and trust of
every request.

Requests are bounded by these (and by the per-field bounds in :mod:`infera.server.protocol`);
a request past a bound is answered with a 4xx that names the flag to change.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
from dataclasses import dataclass

from infera.arg_utils import dataclass_kwargs, option
from infera.pooling_params import PoolingParams
from infera.server.reasoning_parser import REASONING_PARSERS
from infera.server.tool_parsers import TOOL_PARSERS

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass
class ServerConfig:
    """Where ``infera serve`` listens, the model's name in the API, and how many requests may wait."""

    host: str = option("127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    port: int = option(8000, help="port to listen on (0: any free port)")
    served_model_name: str | None = option(None, help="the model's name in the API; None: the model file's stem")
    max_waiting_requests: int = option(
        1024, help="answer 503 to new requests while this many sequences (and scaling searches) wait for the engine")

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in [0, 65535], got {self.port}")
        if self.max_waiting_requests < 1:
            raise ValueError(f"--max-waiting-requests must be >= 1, got {self.max_waiting_requests}")


@dataclass
class ServerOptions:
    """The keys, limits and trust of every request; each field is also a flag of ``infera serve``
    (:func:`server_options` reads them)."""

    api_key: str | None = option(
        None, help="require `Authorization: Bearer KEY` on the API; None: $INFERA_API_KEY if set, else no key")
    max_tokens_default: int | None = option(
        None, help="max_tokens of a request that gives none; None: the rest of the context, as vLLM")
    max_tokens_limit: int | None = option(None, help="refuse requests asking for more tokens (400)")
    request_timeout: float | None = option(
        600.0, help="seconds a request may run from arrival; then it ends with a 408 (0: no limit)")
    max_request_body_bytes: int = option(16 * 2**20, help="refuse larger request bodies with a 413")
    trust_request_chat_template: bool = option(
        False, help="let requests bring their own `chat_template` (rendered sandboxed, time-limited)")
    chat_template_timeout: float = option(5.0, help="seconds a chat template may take to render")
    reward_models: dict[str, str] = option(
        default_factory=dict, flags=("--reward-model",), action="append", flag_default=None, metavar="NAME=PATH",
        help="a PRM/ORM directory that scaling requests may use as reward `model:NAME` (repeatable); requests "
             "never name paths")
    allowed_hosts: tuple[str, ...] | None = option(
        LOOPBACK_HOSTS, nargs="+", flag_default=None, metavar="HOST",
        help="Host header names to answer (* = any); default: loopback names when serving on loopback without an "
             "API key (a defence against DNS rebinding), else any")
    shutdown_timeout: float = option(
        30.0, help="on SIGTERM/Ctrl-C, seconds running requests get to finish before they end with an error")
    tool_call_parser: str | None = option(
        None, choices=sorted(TOOL_PARSERS),
        help="the model's tool call format, parsed into `tool_calls`; None: the format its chat template shows")
    reasoning_parser: str | None = option(
        None, choices=sorted(REASONING_PARSERS),
        help="put the model's <think>...</think> thinking into `reasoning_content`; output constraints apply after it")
    chat_template: str | None = option(
        None, metavar="FILE|TEMPLATE",
        help="the chat template to render instead of the model's: a file, or the Jinja template itself")
    allowed_origins: tuple[str, ...] | None = option(
        None, nargs="+", metavar="ORIGIN",
        help="CORS: origins whose browsers may call the API (* = any); None: no CORS headers")
    allowed_methods: tuple[str, ...] = option(("*",), nargs="+", metavar="METHOD",
                                              help="CORS: methods allowed (with --allowed-origins)")
    allowed_headers: tuple[str, ...] = option(("*",), nargs="+", metavar="HEADER",
                                              help="CORS: request headers allowed (with --allowed-origins)")
    allow_credentials: bool = option(False, help="CORS: allow credentials (with --allowed-origins)")
    pooler_config: str | None = option(
        None, metavar="JSON",
        help='how /v1/embeddings pools the final hidden states, as vLLM: {"pooling_type": "LAST" or "MEAN", '
             '"normalize": true or false}; None: the last token, L2-normalized')

    def __post_init__(self) -> None:
        PoolingParams.from_json(self.pooler_config)  # ValueError for a bad one, at startup
        for name in ("max_tokens_default", "max_tokens_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        for name in ("request_timeout", "chat_template_timeout", "shutdown_timeout", "max_request_body_bytes"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        if (self.max_tokens_default is not None and self.max_tokens_limit is not None
                and self.max_tokens_default > self.max_tokens_limit):
            raise ValueError(f"--max-tokens-default {self.max_tokens_default} is above --max-tokens-limit "
                             f"{self.max_tokens_limit}")


def server_options(args: argparse.Namespace) -> ServerOptions:
    """``infera serve``'s flags as ServerOptions, converted where a flag is not its field: the key falls back
    to $INFERA_API_KEY, a request timeout of 0 is none, ``NAME=PATH`` items make the reward models, and
    the allowed hosts default by the address and the key (:func:`default_allowed_hosts`)."""
    given = dataclass_kwargs(ServerOptions, args)
    for name in ("allowed_origins", "allowed_methods", "allowed_headers"):
        given[name] = _list_flag(given[name])
    api_key = given["api_key"] or os.environ.get("INFERA_API_KEY")
    rewards = {}
    for item in given["reward_models"] or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--reward-model takes NAME=PATH, got {item!r}")
        rewards[name] = path
    return ServerOptions(**dict(given, api_key=api_key, request_timeout=given["request_timeout"] or None,
                                reward_models=rewards,
                                allowed_hosts=default_allowed_hosts(args.host, api_key, given["allowed_hosts"])))


def _list_flag(values: list[str] | tuple[str, ...] | None) -> tuple[str, ...] | None:
    """A list flag's values; one value that is a JSON list (vLLM's spelling, ``'["*"]'``) is that list."""
    if values and len(values) == 1 and values[0].lstrip().startswith("["):
        try:
            items = json.loads(values[0])
        except ValueError:
            raise ValueError(f"not a JSON list of strings: {values[0]}") from None
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise ValueError(f"not a JSON list of strings: {values[0]}")
        return tuple(items)
    return None if values is None else tuple(values)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def default_allowed_hosts(bind_host: str, api_key: str | None, given: list[str] | None) -> tuple[str, ...] | None:
    """``--allowed-hosts`` if given (``*``: any); else loopback names for a keyless loopback server."""
    if given:
        return None if "*" in given else tuple(given)
    if api_key is None and is_loopback(bind_host):
        return LOOPBACK_HOSTS
    return None


def host_name(header: str) -> str:
    """The name part of a Host header: ``[::1]:8000`` -> ``::1``, ``localhost:8000`` -> ``localhost``."""
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header
