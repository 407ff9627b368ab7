"""What the operator decides for every request of ``infera serve``: keys, limits, trust.

Requests are bounded by these (and by the per-field bounds in :mod:`infera.server.protocol`);
a request past a bound is answered with a 4xx that names the flag to change.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass
class ServerOptions:
    api_key: str | None = None
    # a request that gives no max_tokens gets this many (None: up to the end of the context, as vLLM)
    max_tokens_default: int | None = None
    max_tokens_limit: int | None = None  # larger max_tokens are refused (400)
    request_timeout: float | None = 600.0  # seconds from arrival; past it the request ends with a 408
    max_request_body_bytes: int = 16 * 2**20  # larger bodies are refused (413)
    trust_request_chat_template: bool = False  # may a request bring its own `chat_template`?
    chat_template_timeout: float = 5.0  # seconds a chat template may take to render
    reward_models: dict[str, str] = field(default_factory=dict)  # name -> directory (scaling reward "model:NAME")
    # Host header names accepted (None: any); a keyless server on loopback takes loopback names only,
    # so that a web page cannot reach it through DNS rebinding
    allowed_hosts: tuple[str, ...] | None = LOOPBACK_HOSTS
    shutdown_timeout: float = 30.0  # on SIGTERM, seconds running requests get to finish

    def __post_init__(self) -> None:
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
