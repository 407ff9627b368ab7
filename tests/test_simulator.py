"""The cluster simulator: exact schedules on tiny traces, prefix hits as the trace says, policies'
hit rates in order, the cost-model fit, the Mooncake reader, the max-rate goodput search and the CLI."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from infera.cli import main
from infera.router import POLICIES, Router
from infera.sim.cost_model import FEATURES, CostModel, ReplicaLimits, fit, measure_engine, roofline_model, \
    step_features
from infera.sim.goodput import at_rate, max_goodput, trace_rate
from infera.sim.report import summarize
from infera.sim.simulator import Simulator
from infera.sim.trace import TRACE_BLOCK, TraceRequest, ideal_hit_rate, read_mooncake, shared_prefix_trace, \
    trace_request, write_mooncake

MOONCAKE = Path("/work/shared/data/traces/mooncake_conversation_trace.jsonl")


def constant_model(seconds: float = 1.0, **limits) -> CostModel:
    """Every step takes ``seconds``, whatever it computes."""
    return CostModel({"step": seconds}, ReplicaLimits(**{"num_kv_tokens": 4096, "max_num_batched_tokens": 600,
                                                          **limits}))


def test_hand_computed_schedule():
    # One replica, steps of 1 s, 600 tokens per step, blocks of 16.
    # A (t=0, 1000 tokens, 3 out); B (t=0.5, 100 tokens, 2 out); C (t=2.5, 600 tokens whose first trace
    # block is A's, 2 out).
    # step 1 [0,1): A's first 600 prompt tokens (B arrives meanwhile)
    # step 2 [1,2): A's last 400 + B's 100 -> both sample: TTFT A = 2, B = 1.5
    # step 3 [2,3): decodes A, B -> B finishes at 3 (C arrives meanwhile)
    # step 4 [3,4): decode A (finishes at 4) + C: its first 512 tokens are cached, 88 computed -> TTFT C = 1.5
    # step 5 [4,5): decode C -> finishes at 5.  Every inter-token gap is one step.
    trace = [TraceRequest(0.0, 1000, 3, (0, 1)), TraceRequest(0.5, 100, 2, (2,)), TraceRequest(2.5, 600, 2, (0, 5))]
    result = Simulator(trace, 1, "round_robin", constant_model(), progress=False).run()
    a, b, c = result.records
    assert [r.ttft for r in (a, b, c)] == [2.0, 1.5, 1.5]
    assert [r.finish for r in (a, b, c)] == [4.0, 3.0, 5.0]
    assert [r.cached_tokens for r in (a, b, c)] == [0, 0, 512]
    assert list(result.itls) == [1.0] * 4
    assert result.replicas[0].num_steps == 5
    s = summarize(result, slo_ttft=1.5, slo_itl=1.0)
    assert s["finished"] == 3 and s["duration_s"] == 5.0 and s["throughput_tok_s"] == 7 / 5
    assert s["goodput_req_s"] == 2 / 5  # A's TTFT misses the SLO
    assert s["hit_rate"] == 512 / 1700


def test_hand_computed_disaggregated_schedule():
    # 1 prefill + 1 decode replica, steps of 1 s, 600 tokens per step, blocks of 16, 1 ms per token of KV moved.
    # A (t=0, 1000 tokens, 3 out), B (t=0.5, 100 tokens, 2 out); the prefill replica computes their full
    # blocks but the last token's: 992 and 96 tokens.
    # prefill [0,1): A's first 600; [1,2): A's last 392 + B's 96 -> KV sent at 2: B's lands at 2.096, A's at 2.992
    # decode [2.096,3.096): B's last 4 tokens -> first token, TTFT 2.596; [3.096,4.096): B decodes (finishes)
    # + A's last 8 -> TTFT 4.096; [4.096,5.096), [5.096,6.096): A decodes, finishes at 6.096.
    trace = [TraceRequest(0.0, 1000, 3, (0, 1)), TraceRequest(0.5, 100, 2, (2,))]
    result = Simulator(trace, 2, "cache_aware", constant_model(), prefill_replicas=1, kv_transfer_s_per_token=1e-3,
                       progress=False).run()
    a, b = result.records
    assert [a.ttft, b.ttft] == pytest.approx([4.096, 2.596])
    assert [a.finish, b.finish] == pytest.approx([6.096, 4.096])
    assert [a.replica, b.replica] == [0, 0] and [a.cached_tokens, b.cached_tokens] == [0, 0]
    assert list(result.itls) == pytest.approx([1.0] * 3)
    decode, prefill = result.replicas
    assert (prefill.num_steps, decode.num_steps) == (2, 4)
    assert prefill.output_tokens == 0 and decode.output_tokens == 5
    assert all(rep.block_manager.num_free_blocks == rep.block_manager.num_blocks for rep in result.replicas)
    with pytest.raises(ValueError, match="at least one decode replica"):
        Simulator(trace, 1, "cache_aware", constant_model(), prefill_replicas=1)


def test_hand_computed_schedule_with_a_host_tier():
    # One replica of 64 blocks of 16 tokens, a host tier of 256 blocks, steps of 1 s plus 1 ms per token loaded.
    # A (t=0, 600 tokens, 1 out): [0,1), its 37 full blocks cached, then free (the tail first in line).
    # B (t=2, 1000 tokens, no shared block, 1 out): [2,3) takes the 26 never-used blocks and 37 of A's, all
    # but A's first: the 36 full ones among them are copied to the host first.
    # C (t=4, 600 tokens, A's first trace block of 512 tokens, then its own): its first KV block is still
    # on the device, the next 31 come back from the host: [4,5.496), TTFT 1.496 (without the tier: 16 cached);
    # its 37 new blocks are B's last, 36 of them full: copied to the host too.
    trace = [TraceRequest(0.0, 600, 1, (0, 1)), TraceRequest(2.0, 1000, 1, (2, 3)), TraceRequest(4.0, 600, 1, (0, 4))]
    model = constant_model(num_kv_tokens=1024, max_num_batched_tokens=2048)
    result = Simulator(trace, 1, "round_robin", model, host_kv_tokens=4096, kv_load_s_per_token=1e-3,
                       progress=False).run()
    assert [r.cached_tokens for r in result.records] == [0, 0, 512]
    assert [r.ttft for r in result.records] == pytest.approx([1.0, 1.0, 1.496])
    bm = result.replicas[0].block_manager
    assert (bm.num_offloaded_blocks, bm.num_loaded_blocks) == (72, 31)
    without = Simulator(trace, 1, "round_robin", model, progress=False).run()
    assert [r.cached_tokens for r in without.records] == [0, 0, 16]
    assert without.records[2].ttft == 1.0


def test_prefix_hits_equal_the_traces_shared_blocks():
    # arrivals far apart: each request runs alone, after every earlier one finished
    trace = shared_prefix_trace(num_prefixes=2, requests_per_prefix=3, prefix_blocks=2, suffix_tokens=100,
                                output_length=4, interval=100.0)
    result = Simulator(trace, 1, "round_robin", constant_model(0.01, num_kv_tokens=16384), progress=False).run()
    assert [r.cached_tokens for r in result.records] == [0, 0] + [2 * TRACE_BLOCK] * 4
    assert summarize(result, 1.0, 1.0)["hit_rate"] == 4 * 1024 / (6 * 1124)  # tokens
    assert ideal_hit_rate(trace) == 8 / 18  # trace blocks: 4 of 6 requests find both prefix blocks of their 3
    assert all(r.finish is not None for r in result.records)


def test_cache_aware_keeps_prefixes_together(monkeypatch):
    # 3 prefixes over 4 replicas: round robin scatters each prefix over every replica
    trace = shared_prefix_trace(num_prefixes=3, requests_per_prefix=16, prefix_blocks=4, suffix_tokens=200,
                                output_length=8, interval=0.05)
    model = CostModel({"step": 0.002, "tokens": 1e-5}, ReplicaLimits(num_kv_tokens=65536))
    prefilled = []  # the router hears of each request's first token, when it comes
    done = Router.prefill_done
    monkeypatch.setattr(Router, "prefill_done", lambda self, rid: (prefilled.append(rid), done(self, rid)))
    results = {p: Simulator(trace, 4, p, model, progress=False).run() for p in POLICIES}
    assert sorted(prefilled) == sorted([str(i) for i in range(len(trace))] * len(POLICIES))
    rates = {p: summarize(result, 1.0, 1.0)["hit_rate"] for p, result in results.items()}
    assert rates["cache_aware"] >= rates["least_loaded"] and rates["longest_prefix"] >= rates["least_loaded"]
    assert rates["cache_aware"] > rates["round_robin"] + 0.1
    assert results["cache_aware"].router.prefill_blocks == [0] * 4


def test_too_long_requests_are_rejected_and_block_size_must_divide_the_trace_block():
    trace = [TraceRequest(0.0, 5000, 2, tuple(range(10))), TraceRequest(0.0, 100, 2, (99,))]
    result = Simulator(trace, 1, "round_robin", constant_model(), progress=False).run()
    assert [r.replica for r in result.records] == [-1, 0]
    assert summarize(result, 1.0, 1.0)["rejected"] == 1
    with pytest.raises(ValueError, match="divide"):
        Simulator(trace, 1, "round_robin", constant_model(block_size=24), progress=False)


def test_fit_recovers_known_coefficients():
    rng = random.Random(0)
    truth = {"step": 3e-3, "tokens": 2e-5, "seqs": 1e-4, "context": 4e-8, "attention": 5e-10}
    samples = []
    for _ in range(60):
        queries = [(rng.randrange(0, 8000), rng.choice([1, 1, 1, rng.randrange(1, 2048)]))
                   for _ in range(rng.randrange(1, 64))]
        x = step_features(queries)
        samples.append((x, sum(truth[f] * v for f, v in zip(FEATURES, x))))
    coefficients, error = fit(samples)
    assert coefficients == pytest.approx(truth, rel=1e-6)
    assert error < 1e-9


def test_measured_steps_include_a_lone_prompts_first_step(tiny_model):
    from infera.engine.llm_engine import LLMEngine

    engine = LLMEngine(model=str(tiny_model("llama")), dtype="float32")
    hooks = list(engine.hooks)
    samples = measure_engine(engine, workloads=((1, 40, 3), (2, 8, 2)), progress=False)
    # a lone 40-token prompt: its prefill step, then 2 decode steps; two 8-token prompts: 1 + 1 steps
    assert [f for f, _ in samples] == [step_features([(0, 40)]), step_features([(40, 1)]), step_features([(41, 1)]),
                                       step_features([(0, 8), (0, 8)]), step_features([(8, 1), (8, 1)])]
    assert all(seconds > 0 for _, seconds in samples) and engine.hooks == hooks  # its recorder removed


def test_roofline_model_of_an_8b_on_an_h100():
    model = roofline_model("llama-3-8b", "h100-sxm")
    assert 440_000 < model.replica.num_kv_tokens < 470_000  # (0.95 x 80 GB - 16 GB) / 128 KiB per token
    decode = model.step_time(step_features([(4096, 1)] * 32))
    assert 0.004 < decode < 0.02  # 16 GB of weights and 16 GB of KV at 3.35 TB/s, about 10 ms
    assert model.coefficients["step"] > 0


@pytest.mark.skipif(not MOONCAKE.exists(), reason="the Mooncake trace is not here")
def test_read_mooncake():
    requests = read_mooncake(MOONCAKE, limit=5, time_scale=0.5)
    assert len(requests) == 5
    first = requests[0]
    assert (first.arrival, first.input_length, first.output_length) == (0.0, 6758, 500)
    assert first.hash_ids == tuple(range(14))
    assert len(first.prompt_tokens()) == 6758 and first.prompt_tokens()[6757] == 13
    assert requests[1].route_hashes()[0] == first.route_hashes()[0]  # both start with hash id 0
    assert requests[1].route_hashes()[1] != first.route_hashes()[1]


def test_trace_of_real_prompts_round_trips(tmp_path):
    ids: dict[int, int] = {}
    system = list(range(1000, 1000 + 2 * TRACE_BLOCK))
    a = trace_request(0.0, system + [1, 2, 3], 5, ids)
    b = trace_request(1.5, system + [4] * 600, 7, ids)
    assert a.hash_ids == (0, 1, 2) and b.hash_ids == (0, 1, 3, 4)
    write_mooncake([a, b], tmp_path / "run.jsonl")
    assert read_mooncake(tmp_path / "run.jsonl") == [a, b]


def _attainment(trace: list[TraceRequest], factor: float, replicas: int, policy: str, model: CostModel,
                slo_ttft: float, slo_itl: float) -> float:
    s = summarize(Simulator(at_rate(trace, factor), replicas, policy, model, progress=False).run(), slo_ttft, slo_itl)
    return s["slo_met"] / s["requests"]


def test_goodput_is_one_replicas_capacity_with_one_request_per_step():
    # One replica, steps of 1 s, 600 tokens per step; every request a distinct 600-token prompt and one
    # output token: one request per step, 1 request/s of capacity.  At a gap d >= 1 s every TTFT is 1 s;
    # at d < 1 s request k (from 0) waits k (1 - d) more, so with a TTFT SLO of 1.5 s only those with
    # k < 0.5 / (1 - d) meet it: 90 of 100 need d > 1 - 0.5 / 89.  The goodput lies in [1, 1.0057] req/s,
    # so the highest passing rate found is above 1 / 1.05 and at most 1.0057.
    trace = [TraceRequest(float(i), 600, 1, (2 * i, 2 * i + 1)) for i in range(100)]
    assert trace_rate(trace) == 1.0
    g = max_goodput(trace, 1, "round_robin", constant_model(), slo_ttft=1.5, slo_itl=1.0, goal=0.9, start=0.3,
                    tolerance=0.05)
    assert g.converged
    assert 1 / 1.05 < g.rate_req_s <= 1 + 0.5 / 89 and g.per_replica == g.rate_req_s
    assert g.rate_req_s < g.failed_req_s <= 1.05 * g.rate_req_s
    # the probes went up by doubling from 0.3 (0.3, 0.6 pass; 1.2 fails), then bisected
    assert [p.rate_factor for p in g.probes[:3]] == [0.3, 0.6, 1.2]
    assert [p.attainment >= 0.9 for p in g.probes[:3]] == [True, True, False]
    # every probe's attainment is the hand count: request k's first token at k + 1 s (or 1 s after it arrives)
    assert all(p.attainment == sum(k + 1 - k / p.rate_factor <= 1.5 for k in range(100)) / 100 for p in g.probes)


def test_goodput_search_brackets_the_goal_within_its_tolerance():
    trace = shared_prefix_trace(num_prefixes=4, requests_per_prefix=15, prefix_blocks=4, suffix_tokens=300,
                                output_length=16, interval=0.05)
    model = CostModel({"step": 0.004, "tokens": 2e-5, "seqs": 1e-4}, ReplicaLimits(num_kv_tokens=16384))
    slo = {"slo_ttft": 0.25, "slo_itl": 0.02}
    for policy in ("least_loaded", "cache_aware"):
        g = max_goodput(trace, 2, policy, model, goal=0.9, start=4.0, tolerance=0.05, **slo)
        assert g.converged and len(g.probes) <= 16
        assert g.per_replica == g.rate_req_s / 2
        high = g.failed_req_s / g.rate_req_s
        assert 1 < high <= 1.05
        base = trace_rate(trace)
        # re-simulated: the goodput meets the goal, the rate a tolerance above it misses it
        assert _attainment(trace, g.rate_req_s / base, 2, policy, model, **slo) >= 0.9
        assert _attainment(trace, g.rate_req_s * high / base, 2, policy, model, **slo) < 0.9
        # the search brackets: every passing probe is below every failing one
        passed = [p.rate_req_s for p in g.probes if p.attainment >= 0.9]
        failed = [p.rate_req_s for p in g.probes if p.attainment < 0.9]
        assert passed and failed and max(passed) == g.rate_req_s < min(failed) == g.failed_req_s


def test_goodput_search_stops_at_its_probe_bound():
    # a TTFT SLO below one step: no rate meets it; the search halves the rate max_probes times
    trace = [TraceRequest(float(i), 100, 1, (i,)) for i in range(10)]
    g = max_goodput(trace, 1, "round_robin", constant_model(), slo_ttft=0.5, slo_itl=1.0, max_probes=4)
    assert [p.rate_factor for p in g.probes] == [1.0, 0.5, 0.25, 0.125]
    assert g.rate_req_s == 0.0 and not g.converged and g.failed_req_s == 0.125


def test_cli(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["simulate", "--help"])
    assert e.value.code == 0
    trace, cost, out = tmp_path / "trace.jsonl", tmp_path / "cost.json", tmp_path / "out.json"
    write_mooncake(shared_prefix_trace(2, 4, 1, 50, 3, 0.1), trace)
    constant_model(0.01).save(cost)
    assert main(["simulate", "--trace", str(trace), "--replicas", "2", "--cost-model", str(cost), "--time-scale", "2",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["policy"] for r in data["runs"]] == ["round_robin", "least_loaded", "cache_aware", "longest_prefix"]
    assert all(r["finished"] == 8 and r["replicas"] == 2 for r in data["runs"])
    assert data["cost_model"]["coefficients"] == {"step": 0.01}
    assert "cache_aware" in capsys.readouterr().out
    assert main(["simulate", "--trace", str(trace), "--replicas", "2", "--cost-model", str(cost), "--policy",
                 "least_loaded", "--slo-ttft", "0.015", "--goodput-goal", "0.9", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [g["policy"] for g in data["goodput"]] == ["least_loaded"]
    g = data["goodput"][0]
    assert g["converged"] and g["rate_req_s"] < g["failed_req_s"] <= 1.05 * g["rate_req_s"]
    assert g["per_replica_req_s"] == g["rate_req_s"] / 2
    assert "least_loaded" in capsys.readouterr().out
    split = ["simulate", "--trace", str(trace), "--replicas", "2", "--cost-model", str(cost), "--policy", "cache_aware",
             "--prefill-replicas", "1", "--json", str(out)]
    assert main(split) == 2 and "--kv-bytes-per-token" in capsys.readouterr().err  # the model does not say
    assert main([*split, "--kv-bytes-per-token", "131072"]) == 0
    assert json.loads(out.read_text())["runs"][0]["finished"] == 8
    offload = ["simulate", "--trace", str(trace), "--cost-model", str(cost), "--policy", "round_robin",
               "--kv-tokens", "640", "--kv-offloading-size", "0.5", "--json", str(out)]
    assert main(offload) == 2 and "--kv-bytes-per-token" in capsys.readouterr().err
    assert main([*offload, "--kv-bytes-per-token", "131072"]) == 0  # 0.5 GB: a host tier of 3,814 tokens
    [run] = json.loads(out.read_text())["runs"]  # the two prefixes take turns; the device holds one
    assert run["finished"] == 8 and run["host_loaded_tokens"] > 0
    assert run["hit_rate"] == 6 * 512 / (8 * 562)  # every request after the first two finds its prefix
    assert main(offload[:-4] + offload[-2:]) == 0  # no host tier
    [run] = json.loads(out.read_text())["runs"]
    assert run["host_loaded_tokens"] == 0 and run["hit_rate"] < 0.5 * 6 * 512 / (8 * 562)
