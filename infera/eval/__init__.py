"""Evaluation tasks of ``infera eval --task NAME``.

Each task is a module with ``add_arguments(group)`` (its options, in their own ``--help`` group)
and ``run(args)``; register it in :data:`TASKS`.
"""
from __future__ import annotations

import importlib
from types import ModuleType

TASKS: dict[str, str] = {  # task (the part of --task before any ":") -> module
    "perplexity": "infera.eval.perplexity",
    "arithmetic": "infera.eval.scaling",
    "jsonl": "infera.eval.scaling",
    "passkey": "infera.eval.passkey",
    "niah": "infera.eval.passkey",
    "longppl": "infera.eval.longppl",
}


def task_module(name: str) -> ModuleType:
    """The module of task ``name`` (``jsonl:FILE`` is task ``jsonl``)."""
    kind = name.split(":", 1)[0]
    if kind not in TASKS or (kind == "jsonl") != (":" in name):
        raise ValueError(f"unknown eval task {name!r}; choose from perplexity, arithmetic, passkey, niah, longppl, "
                         "jsonl:FILE")
    return importlib.import_module(TASKS[kind])
