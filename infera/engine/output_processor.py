"""Per-token bookkeeping after sampling: incremental detokenization and stop conditions."""
from __future__ import annotations

import copy

from tokenizers.decoders import DecodeStream

from infera.engine.sequence import Sequence
from infera.loader.tokenizer import Tokenizer
from infera.outputs import CompletionOutput, TokenLogprobs


class DetokState:
    """The text of one sequence so far, built one token at a time."""

    def __init__(self, stream: DecodeStream):
        self.stream = stream
        self.text = ""

    def fork(self) -> DetokState:
        child = DetokState(copy.copy(self.stream))
        child.text = self.text
        return child


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, max_model_len: int):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len

    def append_token(self, seq: Sequence, token_id: int, logprobs: TokenLogprobs | None) -> None:
        """Append a sampled token, extend the text and set ``seq.finish_reason`` if it stops."""
        params = seq.params
        seq.append_token(token_id)
        if logprobs is not None:
            seq.logprobs.append(logprobs)
        state = seq.detok_state
        if state is None:
            state = seq.detok_state = DetokState(self.tokenizer.decode_stream(params.skip_special_tokens))
        new_text = self.tokenizer.step_stream(state.stream, token_id)
        state.text += new_text
        if seq.num_output_tokens >= params.min_tokens:
            if token_id in self.tokenizer.eos_token_ids and not params.ignore_eos:
                seq.finish_reason = "stop"
                return
            if token_id in params.stop_token_ids:
                seq.finish_reason, seq.stop_reason = "stop", token_id
                return
            if new_text and params.stop and self._check_stop_strings(state, len(new_text), params.stop,
                                                                     params.include_stop_str_in_output, seq):
                return
        if params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens:
            seq.finish_reason = "length"
        elif seq.num_tokens >= self.max_model_len:
            seq.finish_reason = "length"

    @staticmethod
    def _check_stop_strings(state: DetokState, num_new: int, stops: list[str], include: bool, seq: Sequence) -> bool:
        longest = max(len(s) for s in stops)
        begin = max(0, len(state.text) - num_new - longest + 1)
        found = [(state.text.find(s, begin), s) for s in stops]
        found = [(i, s) for i, s in found if i >= 0]
        if not found:
            return False
        index, stop = min(found)
        state.text = state.text[:index + len(stop) if include else index]
        seq.finish_reason, seq.stop_reason = "stop", stop
        return True

    @staticmethod
    def completion(seq: Sequence) -> CompletionOutput:
        """The sequence's output so far. While it runs, text that might begin a stop string is
        held back so that a streamed prefix never has to be taken back."""
        text = seq.detok_state.text if seq.detok_state else ""
        if seq.finish_reason is None and seq.params.stop:
            text = text[:max(0, len(text) - max(len(s) for s in seq.params.stop) + 1)]
        return CompletionOutput(index=seq.index, text=text, token_ids=seq.output_token_ids,
                                logprobs=seq.logprobs if seq.params.logprobs is not None else None,
                                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason)
