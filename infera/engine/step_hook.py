"""The named points of an engine step where a feature attaches (structured output, speculation, drivers)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from infera.engine.model_runner import StepOutput
    from infera.engine.scheduler import ScheduledBatch
    from infera.engine.sequence import Sequence
    from infera.outputs import RequestOutput


class StepHook(Protocol):
    """A feature of the engine step.  A hook defines any of these methods (none is required); at
    each point :meth:`LLMEngine.step` calls the hooks that define it, drivers first, then the
    engine's hooks in the order they were added (``LLMEngine.add_hook``)."""

    def before_step(self) -> None:
        """The step begins: add, continue or release requests."""

    def admit(self, idle: bool) -> list[Sequence]:
        """Sequences held back until now that may be scheduled from this step on; ``idle``: nothing
        else is scheduled, so a short wait is free."""

    def after_forward(self, batch: ScheduledBatch, seconds: float) -> None:
        """``batch`` ran (forward pass and sampling) in ``seconds``."""

    def on_token(self, seq: Sequence, last: bool) -> int:
        """``seq`` got one more token (``last``: the step's last for it); returns the number of tokens
        the hook appended after it."""

    def after_sampling(self, seq: Sequence, inputs: list[int], draft: list[int], out: StepOutput) -> None:
        """``seq``'s tokens of the step are appended: ``out`` for ``inputs`` (its last token before the
        step and the accepted draft tokens), which verified ``draft``."""

    def on_finish(self, seq: Sequence) -> None:
        """``seq`` finished or was aborted; the scheduler no longer runs it."""

    def after_step(self, outputs: list[RequestOutput]) -> None:
        """The step's outputs are made; the running sequences are those of the next step."""
