"""Evaluation tasks of ``infera eval --task NAME``.

Each task is a module with ``add_arguments(group)`` (its options, in their own ``--help`` group)
and ``run(args)``; register it in :data:`TASKS`.
"""
from __future__ import annotations

import importlib
from types import ModuleType

TASKS: dict[str, str] = {  # task -> module
    "perplexity": "infera.eval.perplexity",
}


def task_module(name: str) -> ModuleType:
    if name not in TASKS:
        raise ValueError(f"unknown eval task {name!r}; choose from {', '.join(TASKS)}")
    return importlib.import_module(TASKS[name])
