"""The peers infera is measured against, driven on the same token ids as infera.

- llama.cpp through llama-cpp-python's low-level API, as llama-server drives it: every request is
  its own sequence with its own KV stream (``kv_unified`` off, so attention reads only that
  sequence's cells), prompt tokens of several sequences are packed into ``n_batch``-token batches,
  and all sequences decode together in one batch per step; greedy, ``n_threads`` threads.
- HF transformers ``generate``: one padded batch (left padding), greedy, ``min_new_tokens`` forcing
  the full output length.
"""
from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import Workload


def llama_cpp_quantize(src: Path, dst: Path, ftype: str = "Q4_0") -> Path:
    """Requantize a GGUF with llama.cpp (its repacked CPU kernels are fastest on Q4_0)."""
    import llama_cpp

    if not dst.exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
        params.allow_requantize = True
        dst.parent.mkdir(parents=True, exist_ok=True)
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize failed with {rc}")
    return dst


_QUIET = None


def _silence_llama_cpp() -> None:
    """Drop llama.cpp's per-load log lines (kept referenced: C holds the callback)."""
    global _QUIET
    import llama_cpp

    if _QUIET is None:
        _QUIET = llama_cpp.llama_log_callback(lambda level, text, data: None)
        llama_cpp.llama_log_set(_QUIET, ctypes.c_void_p(0))


class LlamaCpp:
    def __init__(self, path: Path, n_ctx: int, n_seq: int, n_threads: int = 2, n_batch: int = 512,
                 swa_full: bool = True):
        import llama_cpp

        self.lib = llama_cpp
        _silence_llama_cpp()
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_seq_max = n_seq
        cparams.n_threads = n_threads
        cparams.n_threads_batch = n_threads
        cparams.kv_unified = False  # one KV stream per sequence, n_ctx / n_seq cells each
        cparams.swa_full = swa_full  # False: sliding-window layers keep a window-sized cache
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        self.n_batch = n_batch
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.batch = llama_cpp.llama_batch_init(max(n_batch, n_seq), 0, 1)

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        """items: (token, position, sequence, want_logits)."""
        b = self.batch
        for i, (tok, pos, seq, logits) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, logits
            b.seq_id[i][0] = seq
        b.n_tokens = len(items)
        rc = self.lib.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _argmax(self, i: int) -> int:
        ptr = self.lib.llama_get_logits_ith(self.ctx, i)
        return int(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())

    def generate(self, prompts: list[list[int]], output_len: int) -> dict[str, float]:
        """Greedy, all sequences decoding together; returns timings."""
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        start = time.perf_counter()
        pending = [(t, j, s, j == len(p) - 1) for s, p in enumerate(prompts) for j, t in enumerate(p)]
        next_tok = [0] * len(prompts)
        for c in range(0, len(pending), self.n_batch):
            items = pending[c:c + self.n_batch]
            self._decode(items)
            for i, (_, _, s, last) in enumerate(items):
                if last:
                    next_tok[s] = self._argmax(i)
        first = time.perf_counter()
        for step in range(output_len - 1):
            self._decode([(next_tok[s], len(p) + step, s, True) for s, p in enumerate(prompts)])
            next_tok = [self._argmax(s) for s in range(len(prompts))]
        end = time.perf_counter()
        return {"seconds": end - start, "prefill_s": first - start, "decode_s": end - first}


def run_llama_cpp(path: Path, workload: Workload, n_threads: int = 2) -> dict[str, float]:
    n_seq = len(workload.prompts)
    n_ctx = n_seq * (max(len(p) for p in workload.prompts) + workload.output_len + 64)
    engine = LlamaCpp(path, n_ctx, n_seq, n_threads)
    try:
        return engine.generate(workload.prompts, workload.output_len)
    finally:
        engine.close()


def run_llama_cpp_build(build: Path, path: Path, workload: Workload, n_threads: int = 2) -> dict[str, float]:
    """:func:`run_llama_cpp` in a child process that imports llama-cpp-python from ``build`` (a ``pip
    --target`` folder: another build of llama.cpp, e.g. for AVX2 only, beside the installed one)."""
    repo = Path(__file__).resolve().parent.parent
    code = ("import json, sys; from pathlib import Path; from benchmarks.common import Workload; "
            "from benchmarks.peers import run_llama_cpp; a = json.load(sys.stdin); "
            "print(json.dumps(run_llama_cpp(Path(a['path']), Workload(**a['workload']), a['threads'])))")
    job = {"path": str(path), "workload": dataclasses.asdict(workload), "threads": n_threads}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(build), str(repo)]))
    done = subprocess.run([sys.executable, "-c", code], input=json.dumps(job), env=env, capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def llama_cpp_features(build: Path | None = None) -> str:
    """The CPU features a llama.cpp build uses (``llama_print_system_info``)."""
    code = "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"
    env = dict(os.environ, PYTHONPATH=str(build)) if build else None
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    return " ".join(part.split("=")[0].split(":")[-1].strip() for part in out.split("|")
                    if part.strip().endswith("= 1"))


def run_hf(path: Path, workload: Workload, dtype: torch.dtype, pad_id: int) -> dict[str, float]:
    """HF transformers ``generate`` (greedy, left-padded batch) on a GGUF file or an HF directory."""
    from transformers import AutoModelForCausalLM

    where = dict(gguf_file=path.name) if path.suffix == ".gguf" else {}
    model = AutoModelForCausalLM.from_pretrained(path.parent if where else path, dtype=dtype, **where).eval()
    width = max(len(p) for p in workload.prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in workload.prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in workload.prompts])
    kwargs = dict(attention_mask=mask, do_sample=False, pad_token_id=pad_id)
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
        t1 = time.perf_counter()
        model.generate(ids, max_new_tokens=workload.output_len, min_new_tokens=workload.output_len, **kwargs)
        t2 = time.perf_counter()
    del model
    gc.collect()
    prefill = t1 - t0
    return {"seconds": t2 - t1, "prefill_s": prefill, "decode_s": max(t2 - t1 - prefill, 1e-9)}
