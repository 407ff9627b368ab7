"""Speculative decoding: draft several tokens cheaply, verify them all in one target pass, lossless.

* Proposers (``EngineConfig.speculative``): ``ngram`` (prompt lookup, :mod:`.ngram`), ``recycle``
  (token recycling, :mod:`.recycle`), ``draft:PATH`` (a small model with the same tokenizer,
  :mod:`.draft_model`) and ``self`` / ``self:LAYERS`` (the target with layers skipped,
  :mod:`.self_draft`).
* Draft tokens live in ``Sequence.spec_token_ids``, outside the sequence's tokens: the compute
  target includes them, so the scheduler gives the sequence ``1 + k`` tokens and KV slots, and the
  model runner verifies them with :class:`infera.engine.rejection_sampler.RejectionSampler` in the same pass as
  every other sequence's decode (ragged: each sequence accepts its own number).  The engine then
  appends the accepted tokens one at a time (stop strings, EOS, ``max_tokens`` and grammars may end
  the sequence midway), commits the KV of the tokens kept and rolls back the rest
  (``BlockManager.truncate``), so the prefix cache only ever hashes verified tokens; preemption
  drops drafts.
* :mod:`.controller` picks the number of draft tokens per sequence and step from its acceptance
  rate and the measured cost of a step, down to zero where speculation would not pay.
"""
