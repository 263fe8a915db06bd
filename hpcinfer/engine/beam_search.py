"""Beam search on top of the engine: ``LLM.beam_search(prompts, BeamSearchParams(...))``.

vLLM's offline API and result types (``hpcinfer.beam_search.BeamSearchOutput`` holding
``BeamSearchSequence``s with ``tokens`` (prompt + generated), ``logprobs``, ``cum_logprob``,
``text``), with transformers' beam search semantics, so the best sequences and scores equal
``generate(num_beams=w, do_sample=False, length_penalty=lp, early_stopping=...)``:

- Each step every live beam asks the engine for one token with the top K logprobs,
  K = max(2, 1 + number of EOS ids) * beam_width (0 EOS ids with ignore_eos). The engine
  sees each beam as a new request whose prompt is the beam's tokens: beams forked from one
  parent share its KV blocks through the prefix cache (ref-counted blocks, block_manager.py);
  only the last, partly filled block is computed again. Without prefix caching every step
  recomputes whole beams (correct, slower).
- Of all beams' continuations the K with the highest cumulative logprob are candidates. A
  candidate ending in EOS, or reaching max_tokens (or max_model_len), is finished only if it
  is among the first beam_width candidates; the best beam_width unfinished ones run on.
- A finished sequence's score is cum_logprob / generated_len ** length_penalty, where
  generated_len counts the generated tokens including the EOS (transformers' rule; vLLM
  divides by the whole length, prompt included, without the EOS). At most beam_width
  finished sequences are kept, the best by score.
- Stopping (``early_stopping``, transformers' values): False (the default) stops once the
  best running beam, scored at its current length, cannot beat the worst kept sequence;
  True as soon as beam_width sequences are finished; "never" only when no running beam could
  beat them even at the longest length (with length_penalty > 0).
- Scores come from the raw logits' log-softmax (as transformers with do_sample=False, and
  vLLM's logprobs). ``temperature`` is accepted and ignored (logged): the search is
  deterministic.

Returned: per prompt, the kept sequences best first (beam_width of them).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from hpcinfer.engine.outputs import Logprob
from hpcinfer.engine.params import RequestOutputKind, SamplingParams

log = logging.getLogger(__name__)

@dataclass
class BeamSearchParams:
    """vLLM's BeamSearchParams; ``early_stopping`` is hpcinfer's addition (transformers')."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False
    early_stopping: bool | str = False

    def __post_init__(self) -> None:
        for name, ok, allowed in (
                ("beam_width", _is_int(self.beam_width) and self.beam_width >= 1,
                 "an integer >= 1"),
                ("max_tokens", _is_int(self.max_tokens) and self.max_tokens >= 1,
                 "an integer >= 1"),
                ("temperature", isinstance(self.temperature, (int, float))
                 and self.temperature >= 0, ">= 0"),
                ("length_penalty", isinstance(self.length_penalty, (int, float))
                 and not isinstance(self.length_penalty, bool), "a number"),
                ("early_stopping", self.early_stopping is True or self.early_stopping is False
                 or self.early_stopping == "never", 'False, True or "never"')):
            if not ok:
                raise ValueError(f"BeamSearchParams.{name}={getattr(self, name)!r} is "
                                 f"invalid: must be {allowed}")


@dataclass
class BeamSearchSequence:
    """One beam: ``tokens`` holds the prompt and the generated tokens (vLLM's shape);
    ``logprobs`` per generated token the top-K entries of the step that chose it."""

    tokens: list[int]
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    lora_request: None = None
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class BeamSearchOutput:
    """The kept sequences of one prompt, best first."""

    sequences: list[BeamSearchSequence]


@dataclass
class _Instance:
    """One prompt's search state."""

    prompt_len: int
    max_new: int                                   # max_tokens, capped by max_model_len
    running: list[BeamSearchSequence]
    finished: list[tuple[float, BeamSearchSequence]] = field(default_factory=list)
    num_generated: int = 0
    is_done: bool = False
    lora_request: object | None = None            # the prompt's adapter (its beams' too)


def beam_search(engine, prompts: list, params: BeamSearchParams,
                lora_requests: list | None = None) -> list[BeamSearchOutput]:
    """Run the search for every prompt at once (all live beams share each engine step).
    ``lora_requests``: one LoRARequest (or None) per prompt, checked by the caller; every beam
    of a prompt runs with its adapter."""
    if not isinstance(params, BeamSearchParams):
        raise ValueError(f"params must be a BeamSearchParams (hpcinfer.sampling_params), got "
                         f"{type(params).__name__}")
    if params.temperature > 0:
        log.warning("BeamSearchParams.temperature=%s is ignored: beam search is deterministic "
                    "(transformers' num_beams with do_sample=False)", params.temperature)
    if engine.has_unfinished_requests():
        raise ValueError("beam_search() steps the engine until its own requests finish: call "
                         "it when no other request is running")
    eos = frozenset() if params.ignore_eos else engine.eos_token_ids
    instances = []
    for i, prompt in enumerate(prompts):
        try:
            _, tokens = engine.tokenize_prompt(prompt, f"beam prompt {i}")
        except ValueError as e:
            raise ValueError(f"prompt {i}: {e}") from None
        max_new = min(params.max_tokens, engine.max_model_len - len(tokens))
        if max_new < 1:
            raise ValueError(f"prompt {i}: its {len(tokens)} tokens leave no room to generate "
                             f"within max_model_len={engine.max_model_len}")
        lora = lora_requests[i] if lora_requests is not None else None
        instances.append(_Instance(len(tokens), max_new, [BeamSearchSequence(tokens)],
                                   lora_request=lora))
    # (never more than the vocabulary: a huge width on a tiny model)
    num_candidates = min(max(2, 1 + len(eos)) * params.beam_width, engine.spec.vocab_size)
    step_params = _step_params(num_candidates)
    while not all(inst.is_done for inst in instances):
        live = [inst for inst in instances if not inst.is_done]
        beams = [(beam, inst.lora_request) for inst in live for beam in inst.running]
        tops = _next_token_logprobs(engine, [b.tokens for b, _ in beams], step_params,
                                    [lora for _, lora in beams])
        start = 0
        for inst in live:
            count = len(inst.running)
            _advance(inst, tops[start:start + count], params, eos, num_candidates)
            start += count
    return [_output(inst, engine.tokenizer) for inst in instances]


def _step_params(num_candidates: int) -> SamplingParams:
    # The engine's own request: checked here, so max_logprobs (a user limit) does not apply.
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=num_candidates,
                            detokenize=False).resolved()
    params.output_kind = RequestOutputKind.FINAL_ONLY
    params.is_resolved = True
    return params


def _next_token_logprobs(engine, token_lists: list[list[int]], params: SamplingParams,
                         loras: list) -> list[dict[int, Logprob]]:
    """One token per beam through the engine; per beam its top-K {token: Logprob}."""
    ids = [f"beam-{i}" for i in range(len(token_lists))]
    for request_id, tokens, lora in zip(ids, token_lists, loras):
        engine.add_request(request_id, {"prompt_token_ids": tokens}, params, lora_request=lora)
    done = {}
    try:
        while engine.has_unfinished_requests():
            for out in engine.step(final_only=True):
                done[out.request_id] = out.outputs[0].logprobs[0]
    finally:
        engine.abort_request([r for r in ids if r not in done])
    return [done[r] for r in ids]


def _advance(inst: _Instance, tops: list[dict[int, Logprob]], params: BeamSearchParams,
             eos: frozenset[int], num_candidates: int) -> None:
    """One step of transformers' beam search for one prompt (see the module docstring)."""
    candidates = sorted(((beam.cum_logprob + lp.logprob, beam, token, top)
                         for beam, top in zip(inst.running, tops) for token, lp in top.items()),
                        key=lambda c: c[0], reverse=True)[:num_candidates]
    is_last = inst.num_generated + 1 >= inst.max_new
    generated_len = inst.num_generated + 1
    can_add = not (params.early_stopping is True and len(inst.finished) == params.beam_width)
    running = []
    for rank, (cum, beam, token, top) in enumerate(candidates):
        child = BeamSearchSequence(beam.tokens + [token], beam.logprobs + [top], cum_logprob=cum)
        if token in eos or is_last:
            if rank < params.beam_width and can_add:
                child.finish_reason = "stop" if token in eos else "length"
                inst.finished.append((cum / generated_len ** params.length_penalty, child))
        elif len(running) < params.beam_width:
            running.append(child)
    inst.finished = sorted(inst.finished, key=lambda f: f[0], reverse=True)[:params.beam_width]
    inst.running, inst.num_generated = running, generated_len
    inst.is_done = (is_last or not running or not _can_improve(inst, params)
                    or (params.early_stopping is True
                        and len(inst.finished) == params.beam_width))


def _can_improve(inst: _Instance, params: BeamSearchParams) -> bool:
    """transformers' early-stop heuristic: could the best running beam still beat the worst
    kept sequence?"""
    if len(inst.finished) < params.beam_width:
        return True
    if params.early_stopping == "never" and params.length_penalty > 0:
        best_len = inst.max_new
    else:
        best_len = inst.num_generated
    best_possible = inst.running[0].cum_logprob / best_len ** params.length_penalty
    return best_possible > inst.finished[-1][0]


def _output(inst: _Instance, tokenizer) -> BeamSearchOutput:
    sequences = [seq for _, seq in inst.finished]
    for seq in sequences:
        seq.text = tokenizer.decode(seq.tokens)  # vLLM's: prompt and generated text
    return BeamSearchOutput(sequences)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
