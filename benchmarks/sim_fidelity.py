"""Simulator fidelity: a real run of the bundled model on this machine beside its simulation.

Runs ``--requests`` requests through an :class:`LLMEngine`, one every ``--interval`` seconds (half
of them behind a shared 1,024-token system prompt, so the prefix cache matters), records the run
as a Mooncake trace (``--trace``), replays that trace through one simulated replica with the
fitted cost model, and prints TTFT p50 and output throughput of both.

    infera simulate --fit docs/cost_model_cpu.json      # the cost model, once per machine
    python benchmarks/sim_fidelity.py --cost-model docs/cost_model_cpu.json
    infera simulate --trace /tmp/fidelity_trace.jsonl --replicas 1 --policy round_robin \\
        --cost-model docs/cost_model_cpu.json           # the same replay from the CLI
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from infera.engine.llm_engine import LLMEngine
from infera.sampling_params import SamplingParams
from infera.sim.cost_model import CostModel
from infera.sim.report import summarize
from infera.sim.simulator import Simulator
from infera.sim.trace import trace_request, write_mooncake


def real_run(engine: LLMEngine, plan: list[tuple[float, list[int], int]]) -> dict:
    """Submit each ``(arrival s, prompt, output tokens)`` at its time; TTFT p50 and throughput."""
    start, pending, done = time.monotonic(), list(plan), []
    while pending or engine.has_unfinished_requests():
        now = time.monotonic() - start
        while pending and pending[0][0] <= now:
            _, prompt, n = pending.pop(0)
            engine.add_request(prompt, SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0))
        if not engine.has_unfinished_requests():
            time.sleep(pending[0][0] - now)
            continue
        done += [out for out in engine.step() if out.finished]
    span = max(o.metrics.finished_time for o in done) - min(o.metrics.arrival_time for o in done)
    return {"ttft_p50_s": statistics.median(o.metrics.first_token_time - o.metrics.arrival_time for o in done),
            "throughput_tok_s": sum(len(o.outputs[0].token_ids) for o in done) / span}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cost-model", default="docs/cost_model_cpu.json")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--interval", type=float, default=1.0, help="seconds between arrivals")
    p.add_argument("--trace", default="/tmp/fidelity_trace.jsonl", help="where the run's trace is written")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    engine = LLMEngine()
    rng = random.Random(args.seed)
    vocab = engine.runner.vocab_size
    system = [rng.randrange(vocab) for _ in range(1024)]
    plan = []
    for i in range(args.requests):
        own = [rng.randrange(vocab) for _ in range(rng.choice([100, 300, 600]))]
        plan.append((i * args.interval, system + own if i % 2 == 0 else own, rng.choice([16, 32, 64])))
    ids: dict[int, int] = {}
    trace = [trace_request(arrival, prompt, n, ids) for arrival, prompt, n in plan]
    write_mooncake(trace, args.trace)
    real = real_run(engine, plan)
    s = summarize(Simulator(trace, 1, "round_robin", CostModel.load(args.cost_model), progress=False).run(), 1.0, 1.0)
    simulated = {"ttft_p50_s": s["ttft_s"]["p50"], "throughput_tok_s": s["throughput_tok_s"]}
    print(json.dumps({"real": real, "simulated": simulated, "trace": args.trace}, indent=1))


if __name__ == "__main__":
    main()
