"""The router alone: policies, the cost rule, the balance rule, the cache threshold, affinity, replicas going
down (pure Python)."""
import pytest

from infera.router import PrefixIndex, RouteRequest, Router, block_hashes


def req(rid: str, hashes=(), affinity=None) -> RouteRequest:
    return RouteRequest(rid, list(hashes), affinity)


def test_block_hashes_match_the_block_manager_chain():
    from infera.engine.block_manager import BlockManager
    from infera.engine.sequence import Sequence
    from infera.sampling_params import SamplingParams

    tokens = list(range(40))
    bm = BlockManager(num_blocks=8, block_size=16, enable_prefix_caching=True)
    seq = Sequence(tokens, SamplingParams(max_tokens=1))
    assert bm.allocate_slots(seq, len(tokens))
    bm.commit(seq, len(tokens))
    assert block_hashes(tokens, 16) == [bm.blocks[b].hash for b in seq.block_table[:2]]
    assert block_hashes(tokens[:15], 16) == []


def test_prefix_index_matches_leading_run_and_evicts_chain_ends_first():
    index = PrefixIndex(capacity=4)
    index.insert([1, 2, 3])
    assert index.match([1, 2, 3, 4]) == 3 and index.match([9, 10]) == 0
    index.insert([7, 8])  # 5 blocks > 4: the oldest chain loses its end, not its start
    assert index.match([1, 2, 3]) == 2 and index.match([7, 8]) == 2 and len(index) == 4
    with pytest.raises(ValueError):
        PrefixIndex(0)


def test_round_robin_skips_down_replicas():
    router = Router(3, "round_robin")
    assert [router.route(req(f"a{i}")) for i in range(4)] == [0, 1, 2, 0]
    router.mark_down(1)
    assert [router.route(req(f"b{i}")) for i in range(3)] == [2, 0, 2]


def test_least_loaded_picks_the_lighter_of_two():
    router = Router(2, "least_loaded", seed=1)
    for i in range(10):
        router.route(req(f"r{i}"))
    assert router.loads == [5, 5]  # with two replicas both are always drawn
    router.finish("r0"), router.finish("r2"), router.finish("r4")
    light = min(range(2), key=lambda r: router.loads[r])
    assert router.route(req("x")) == light


def test_longest_prefix_follows_the_prefix_until_imbalanced():
    router = Router(2, "longest_prefix", balance_abs_threshold=2, balance_rel_threshold=1.5)
    system = [11, 12, 13]
    first = router.route(req("s0", system + [100]))
    assert router.route(req("other", [50, 51])) != first  # no match anywhere: the least loaded
    router.finish("other")
    assert router.route(req("s1", system + [101])) == first
    assert router.route(req("s2", system + [102])) == first
    # loads 3 vs 0: 3 - 0 > 2 and 3 > 0 * 1.5, so the next one goes to the idle replica
    assert router.route(req("s3", system + [103])) != first
    assert router.hit_rate == pytest.approx((3 + 3) / (4 + 2 + 4 + 4 + 4))


def test_cache_threshold_sends_short_matches_to_the_least_loaded():
    router = Router(2, "longest_prefix", cache_threshold=0.5)
    assert router.route(req("a", [1, 2, 3, 4])) == 0  # all idle and empty: the first
    # 1 of 4 blocks held by replica 0 (0.25 < 0.5): the least loaded, replica 1
    assert router.route(req("b", [1, 20, 21, 22])) == 1
    router.finish("b")  # loads 1 vs 0
    # 3 of 4 (0.75), and 2 of 4 (0.5 reaches the threshold): the busier replica that holds them
    assert router.route(req("c", [1, 2, 3, 30])) == 0
    assert router.route(req("d", [1, 2, 40, 41])) == 0
    assert router.loads == [3, 0]
    assert router.route(req("e", [1, 50, 51, 52])) == 1  # 1 of 4 again: the idle one
    with pytest.raises(ValueError, match="cache_threshold"):
        Router(2, "longest_prefix", cache_threshold=1.5)


def test_cache_threshold_spreads_a_burst_sharing_a_short_prefix():
    # a Mooncake burst: 8 requests at once, each 10 blocks of which only the first is common
    burst = [req(f"r{i}", [0] + [100 * i + k for k in range(1, 10)]) for i in range(8)]
    spread = Router(4, "longest_prefix", cache_threshold=0.3)
    placed = [spread.route(r) for r in burst]
    assert sorted(placed) == [0, 0, 1, 1, 2, 2, 3, 3]
    # without the threshold every one follows the shared block to replica 0: the balance rule
    # (32 more outstanding than the least loaded) is far off
    piled = Router(4, "longest_prefix", cache_threshold=0.0)
    assert [piled.route(r) for r in burst] == [0] * 8
    # a conversation's next turn (its previous prompt and two blocks more: 10 of 12) finds its replica
    assert spread.route(req("t", [*burst[5].block_hashes, 999, 998])) == placed[5]


def test_cache_aware_weighs_the_prefill_it_adds_against_the_queued_prefill():
    router, sglang = Router(2, "cache_aware", prefill_weight=8), Router(2, "longest_prefix")
    a = req("a", [1, 2, 3] + list(range(100, 137)))
    assert router.route(a) == 0 and sglang.route(a) == 0  # idle and empty: the first
    assert router.prefill_blocks == [40, 0] and router.loads == [1, 0]
    # replica 0 holds 3 of x's 5 blocks but has 40 to prefill: 8 * 2 + 40 + 1 = 57 against 8 * 5 = 40 on
    # the idle replica 1, so x goes there (SGLang's rule would follow the prefix: 3 of 5 blocks, loads 1 vs 0)
    x = req("x", [1, 2, 3, 4, 5])
    assert router.route(x) == 1 and sglang.route(x) == 0
    assert router.prefill_blocks == [40, 5]
    router.prefill_done("a")  # a's first token: its blocks leave replica 0's queue, a stays outstanding
    assert router.prefill_blocks == [0, 5] and router.loads == [1, 1]
    # both hold 3 blocks of y: 8 * 2 + 0 + 1 = 17 on replica 0 against 8 * 2 + 5 + 1 = 22 on replica 1
    assert router.route(req("y", [1, 2, 3, 8, 9])) == 0
    router.finish("x"), router.finish("y"), router.finish("a")
    assert router.prefill_blocks == [0, 0] and router.loads == [0, 0]
    # weight 0: the load alone (queued blocks and requests), the cache ignored
    flat = Router(2, "cache_aware", prefill_weight=0)
    flat.route(req("b", [1, 2, 3, 4]))
    assert flat.route(req("c", [1, 2, 3, 4])) == 1
    with pytest.raises(ValueError, match="prefill_weight"):
        Router(2, "cache_aware", prefill_weight=-1)


def test_affinity_keeps_branches_together_while_one_is_outstanding():
    router = Router(2, "round_robin")
    a = router.route(req("p0", affinity="problem"))
    assert router.route(req("p1", affinity="problem")) == a
    router.finish("p0"), router.finish("p1")
    assert router.route(req("filler")) == 1 - a  # released: p2 takes its round-robin turn
    p2 = router.route(req("p2", affinity="problem"))
    assert p2 == a and router.route(req("p3", affinity="problem")) == p2
    router.mark_down(p2)  # the pinned replica went down: the key moves with the next request
    p4 = router.route(req("p4", affinity="problem"))
    assert p4 == 1 - a and router.route(req("p5", affinity="problem")) == p4


def test_mark_down_returns_lost_requests_and_clears_the_index():
    router = Router(2, "cache_aware")
    r = router.route(req("a", [1, 2]))
    router.route(req("b", [1, 2]))
    assert router.mark_down(r) == ["a", "b"] and router.loads[r] == 0
    assert router.route(req("c", [1, 2])) == 1 - r
    router.mark_down(1 - r)
    with pytest.raises(RuntimeError, match="no engine replica"):
        router.route(req("d"))
    router.mark_up(r)
    assert router.route(req("d", [1, 2])) == r and router.indexes[r].match([1, 2]) == 2


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="round_robin"):
        Router(2, "random")
