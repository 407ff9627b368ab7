"""Independent samples, then a choice: best-of-N, self-consistency, weighted best-of-N.

All ``budget`` samples share the prompt's KV (it is computed once, then forked); each advances
one step at a time, like the branches of the search methods, so a sample stops as soon as it
has marked an answer.  Rewards score finished samples only (every step with ``reject_below``).
"""
from __future__ import annotations

from infera.scaling.search import Branch, Search, SearchGen
from infera.scaling.result import ScalingResult
from infera.scaling.selection import argmax, vote
from infera.scaling.stopping import CONFIDENCE_GROUP, trace_confidence

DROPPED = ("low_confidence", "rejected")  # samples ended early that are no candidates (deepconf, reject_below)


def sample(s: Search) -> SearchGen:
    """``budget`` solutions, each stepped to its end and then scored; returns the finished ones in
    launch order.  With a stopping rule (``s.config.stopping``) they are launched in windows and
    the rule is checked after every step: once it holds, the running ones are released (deepconf
    also drops, after its warm-up, each sample whose confidence falls below the warm-up's threshold).
    Once a shared token budget (``s.pool``) is spent, the running ones are released too (as soon as
    one sample has finished)."""
    rule = s.config.stopping
    samples: list[Branch] = []  # launch order
    finished: list[Branch] = []  # finishing order
    confidences: list[float] = []  # theirs (deepconf)
    active: list[int] = []  # indices into samples
    threshold = None

    def kept() -> list[Branch]:
        return [b for b in samples if b.finished and b.finish_reason not in DROPPED]

    while True:
        if s.pool is not None and s.pool.exhausted and kept():  # the batch's token budget is spent
            for i in active:
                s.release(samples[i])
            return kept()
        if not active:
            n = s.budget - len(samples) if rule is None else rule.next_window(len(samples), s.budget)
            if n == 0:
                return kept()
            if rule is not None and samples:
                threshold = rule.threshold(confidences)
            active = list(range(len(samples), len(samples) + n))
            samples += (yield from s.expand([(s.root, n)]))[0]
        else:
            children = yield from s.expand([(samples[i], 1) for i in active])
            for i, (child,) in zip(active, children):
                samples[i] = child
        if threshold is not None:  # deepconf: drop the samples whose last group of tokens is below it
            for i in active:
                last = samples[i].confidences[-CONFIDENCE_GROUP:]
                if len(last) == CONFIDENCE_GROUP and sum(last) < threshold * CONFIDENCE_GROUP:
                    samples[i].finish_reason = "low_confidence"
                    s.release(samples[i])
            active = [i for i in active if samples[i].finish_reason not in DROPPED]
        if s.config.reject_below is not None:  # early rejection: score every step, end the low ones
            yield from s.score([samples[i] for i in active])
            for i in active:
                b = samples[i]
                if b.scores and b.scores[-1] < s.config.reject_below:
                    b.finish_reason = "rejected"
                    s.release(b)
            active = [i for i in active if samples[i].finish_reason not in DROPPED]
        newly = [samples[i] for i in active if samples[i].finished]
        yield from s.score(newly)
        finished += newly
        if rule is not None and rule.needs_confidence:
            confidences += [trace_confidence(b.confidences) for b in newly]
        active = [i for i in active if not samples[i].finished]
        if rule is not None and newly and rule.settled([s.extract(b.text) for b in finished], len(active),
                                                       confidences):
            for i in active:
                s.release(samples[i])
            return kept()


def vote_weights(s: Search, samples: list[Branch]) -> list[float] | None:
    """The samples' weights in a vote: their confidences under deepconf, else None (one each)."""
    rule = s.config.stopping
    return None if rule is None else rule.weights([trace_confidence(b.confidences) for b in samples])


def pick_best(s: Search, samples: list[Branch]) -> ScalingResult:
    """The sample with the highest (aggregated) reward."""
    return s.finish(samples[argmax([s.value(b) for b in samples])], samples)


def pick_majority(s: Search, samples: list[Branch]) -> ScalingResult:
    """The most frequent answer (majority vote)."""
    winners, votes = vote([s.extract(b.text) for b in samples], vote_weights(s, samples))
    return s.finish(samples[winners[0]], samples, votes)


def pick_weighted(s: Search, samples: list[Branch]) -> ScalingResult:
    """The answer with the largest sum of rewards over the samples that give it."""
    values = [s.value(b) for b in samples]
    winners, totals = vote([s.extract(b.text) for b in samples], values)
    return s.finish(samples[max(winners, key=lambda i: (values[i], -i))], samples, totals)


PICKS = {"best_of_n": pick_best, "self_consistency": pick_majority, "weighted_best_of_n": pick_weighted}


def best_of_n(s: Search) -> SearchGen:
    """Best-of-N: ``budget`` samples, the one with the highest reward wins."""
    return (yield from shared_samples(s, ["best_of_n"]))[0]


def self_consistency(s: Search) -> SearchGen:
    """Self-consistency: ``budget`` samples, the most frequent answer wins (no reward needed)."""
    return (yield from shared_samples(s, ["self_consistency"]))[0]


def weighted_best_of_n(s: Search) -> SearchGen:
    """Weighted best-of-N: ``budget`` samples, the answer with the largest summed reward wins."""
    return (yield from shared_samples(s, ["weighted_best_of_n"]))[0]


def shared_samples(s: Search, methods: list[str]) -> SearchGen:
    """One set of samples, chosen from by each of ``methods`` (``infera eval`` evaluates the
    three sampling methods at a budget on the same samples); returns one result per method."""
    samples = yield from sample(s)
    results = []
    for m in methods:
        result = PICKS[m](s, samples)
        result.method = m
        results.append(result)
    return results
