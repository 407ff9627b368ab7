"""What a scaling method returns: the chosen answer, every candidate with its scores, the tokens spent."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Candidate:
    text: str
    steps: list[str]
    answer: str | None
    score: float | None  # the reward, aggregated over its step scores (None without a reward)
    step_scores: list[float]
    num_tokens: int
    finish_reason: str | None  # stop (end of sequence), answer, length, steps (max_steps)
    confidence: float | None = None  # its lowest group confidence (adaptive stopping: deepconf)


@dataclass
class ScalingResult:
    method: str
    budget: int
    answer: str | None  # the chosen answer, extracted from ``text``
    text: str  # the chosen solution
    candidates: list[Candidate]
    answer_scores: dict[str, float] = field(default_factory=dict)  # votes or summed rewards per answer
    generated_tokens: int = 0  # sampled by every branch, pruned ones included
    prefill_tokens: int = 0  # prompt tokens computed (the problem's prompt, continued branches, judge questions)
    cached_tokens: int = 0  # prompt tokens whose KV came from a fork or the prefix cache instead
    judge_passes: int = 0  # prefill-only passes of a self-judging reward
    steps: int = 0  # search iterations
    wall_s: float = 0.0

    @property
    def tokens(self) -> int:
        """Tokens the model computed: generated plus prefilled."""
        return self.generated_tokens + self.prefill_tokens

    def summary(self) -> dict[str, Any]:
        """The result without the candidates' texts (the server's ``scaling`` object)."""
        d = asdict(self)
        d["candidates"] = [{k: v for k, v in c.items() if k not in ("text", "steps")} for c in d["candidates"]]
        return d
