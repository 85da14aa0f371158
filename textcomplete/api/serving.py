"""OpenAI completion semantics without HTTP: prompts x n -> engine requests -> Completion objects and chunks.

Owns prompt tokenizing, the context check (R23), best_of ranking, echo, the logprobs object with
text offsets (R34-R39), stop sequences, usage, and the stream chunk sequence (R42s-R44s).
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from textcomplete.api.errors import invalid, model_not_found
from textcomplete.api.limits import Admission, KeyLimiter, ServerLimits, Ticket
from textcomplete.api.protocol import CompletionRequest
from textcomplete.api.text import ChoiceText
from textcomplete.engine.async_engine import AsyncEngine
from textcomplete.engine.outputs import TokenLogprob
from textcomplete.engine.sampling_params import SamplingParams
from textcomplete.fim import detect_fim


@dataclass
class RequestInfo:
    """What one HTTP request did, filled in as it runs: for its log line, the metrics and its queue place."""

    key_id: str = "-"
    arrival: float = field(default_factory=time.monotonic)
    model: str | None = None
    user: str | None = None
    stream: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_at: float | None = None
    error: str | None = None
    client_left: bool = False      # the client disconnected before its whole response was sent
    ticket: Ticket | None = None

    def release(self) -> None:
        if self.ticket is not None:
            self.ticket.release()


@dataclass
class Prompt:
    index: int
    token_ids: list[int]           # what the engine receives
    text: str                      # what echo shows: the string as given, or the ids decoded
    echo_span: tuple[int, int] | None = None   # the caller's own tokens within token_ids (None: all)

    @property
    def echoed_positions(self) -> range:
        return range(*self.echo_span) if self.echo_span else range(len(self.token_ids))


@dataclass
class Candidate:
    """One generated sequence for one prompt (best_of of them per prompt; n are returned)."""

    prompt: Prompt
    text: ChoiceText
    engine_id: str
    logprobs: list[TokenLogprob] = field(default_factory=list)         # per generated token
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # prompt positions 1..
    finish_reason: str | None = None
    num_generated: int = 0
    num_cached_tokens: int = 0     # prompt tokens the engine served from its prefix cache
    index: int = 0                 # the choice index once chosen
    sent_chars: int = 0            # streaming: text and tokens already sent
    sent_tokens: int = 0
    sent_echo: bool = False
    sent_final: bool = False

    def mean_logprob(self) -> float:
        return sum(e.logprob for e in self.logprobs) / len(self.logprobs) if self.logprobs else 0.0


class CompletionService:
    def __init__(self, engine: AsyncEngine, model_names: list[str], limits: ServerLimits | None = None) -> None:
        self.engine = engine
        self.limits = limits or ServerLimits()
        self.admission = Admission(engine.max_num_seqs, self.limits.max_queued_requests,
                                   int(engine.kv_cache_tokens * self.limits.kv_overcommit))
        self.key_limiter = KeyLimiter(self.limits.requests_per_minute, self.limits.tokens_per_minute)
        self.metrics = None   # a Metrics, when the server exposes them
        self.tokenizer = engine.tokenizer
        self.model_names = model_names
        self.fingerprint = engine.fingerprint
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.vocab_size
        self.fim = detect_fim(self.tokenizer)

        self.fault_injection = False   # tests only: lets FAULT_USER requests fail on purpose

    @property
    def supports_suffix(self) -> bool:
        return self.fim is not None

    def capacity_headers(self, key_id: str = "-") -> dict[str, str]:
        """x-ratelimit-* (R54): the key's own budgets where per-key limits are set; otherwise the server's
        capacity (engine requests in flight against running + queue, free KV tokens against the cache)."""
        stats, block_size = self.engine.stats(), self.engine.block_size
        headers = {"x-ratelimit-limit-requests": str(self.admission.capacity),
                   "x-ratelimit-remaining-requests": str(max(0, self.admission.capacity - self.admission.in_flight)),
                   "x-ratelimit-reset-requests": "0s", "x-ratelimit-limit-tokens": str(stats.kv_blocks_total * block_size),
                   "x-ratelimit-remaining-tokens": str(stats.kv_blocks_free * block_size),
                   "x-ratelimit-reset-tokens": "0s"}
        if self.key_limiter.enabled:
            headers |= self.key_limiter.headers(key_id)
        return headers

    def _injected_fault(self, req: CompletionRequest) -> bool:
        return self.fault_injection and req.user == FAULT_USER

    # ----- preparing -----------------------------------------------------------------------------

    def _prompts(self, req: CompletionRequest) -> list[Prompt]:
        if req.suffix is not None and self.fim is None:
            raise invalid(f"The model `{req.model}` cannot insert text: its tokenizer has no fill-in-the-middle "
                          "tokens, so 'suffix' is not supported.", param="suffix", code="unsupported_parameter")
        prompts = []
        for i, p in enumerate(req.prompts):
            if isinstance(p, str):
                ids = self.tokenizer.encode(p, add_special_tokens=req.suffix is None)
                if not ids and req.suffix is None:
                    ids = list(self.tokenizer.eos_token_ids[:1])
                prompt = Prompt(i, ids, p)
            else:
                bad = next((t for t in p if not 0 <= t < self.vocab_size), None)
                if bad is not None:
                    raise invalid(f"Invalid token id {bad} in 'prompt': the vocabulary has ids 0 to "
                                  f"{self.vocab_size - 1}.", param="prompt", code="invalid_value")
                prompt = Prompt(i, p, self.tokenizer.decode(p))
            if req.suffix is not None:
                fim = self.fim.build(prompt.token_ids, self.tokenizer.encode(req.suffix, add_special_tokens=False))
                prompt = Prompt(i, fim.token_ids, prompt.text, fim.prefix_span)
            prompts.append(prompt)
        for p in prompts:
            wanted = len(p.token_ids) + (req.max_tokens or 0)
            if wanted > self.max_model_len:
                raise invalid(f"This model's maximum context length is {self.max_model_len} tokens, however you "
                              f"requested {wanted} tokens ({len(p.token_ids)} in your prompt; {req.max_tokens or 0} "
                              f"for the completion). Please reduce your prompt; or completion length.")
        return prompts

    def _params(self, req: CompletionRequest, candidate: int) -> SamplingParams:
        bad = next((t for t in req.logit_bias if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise invalid(f"Invalid key in 'logit_bias': token id {bad} is not in the vocabulary "
                          f"(0 to {self.vocab_size - 1}).", param="logit_bias", code="invalid_value")
        ranking = req.best_of > req.n
        return SamplingParams(
            max_tokens=req.max_tokens, temperature=req.temperature, top_p=max(req.top_p, 1e-9),
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
            logit_bias=req.logit_bias, seed=None if req.seed is None else req.seed + candidate,
            stop_token_ids=self.fim.stop_token_ids if req.suffix is not None else (),
            logprobs=req.logprobs if req.logprobs is not None else (0 if ranking else None),
            prompt_logprobs=req.logprobs if req.echo and req.logprobs is not None else None)

    def check_model(self, model: str) -> None:
        if model not in self.model_names:
            raise model_not_found(model)

    def _check_size(self, req: CompletionRequest) -> None:
        lim = self.limits
        if len(req.prompts) > lim.max_prompts_per_request:
            raise invalid(f"Invalid 'prompt': array too long. This server takes at most {lim.max_prompts_per_request} "
                          f"prompts per request, but got {len(req.prompts)}.", param="prompt",
                          code="array_above_max_length")
        sequences = len(req.prompts) * req.best_of
        if sequences > lim.max_sequences_per_request:
            name = "best_of" if req.best_of > req.n else "n"
            raise invalid(f"Too many completions: {len(req.prompts)} prompts x {name}={req.best_of} is {sequences}, "
                          f"and this server generates at most {lim.max_sequences_per_request} per request.",
                          param=name, code="invalid_value")

    def _candidates(self, req: CompletionRequest,
                    info: RequestInfo | None = None) -> tuple[list[Candidate], list[SamplingParams]]:
        """Validate and prepare; with `info`, also charge the key's rate limits and take a place in the queue
        (released through info.release())."""
        self.check_model(req.model)
        self._check_size(req)
        prompts = self._prompts(req)
        base = uuid.uuid4().hex
        cands, params = [], []
        for p in prompts:
            for j in range(req.best_of):
                cands.append(Candidate(p, ChoiceText(self.tokenizer, req.stop), f"{base}-{p.index}-{j}",
                                       index=p.index * req.n + j))
                params.append(self._params(req, j))
            try:   # refused here, a request fails with a 400 before any stream begins
                self.engine.check_request(p.token_ids, params[-1])
            except ValueError as exc:
                raise invalid(str(exc)) from exc
        most = sum(self._most_tokens(len(c.prompt.token_ids), req.max_tokens) for c in cands)
        if not self.admission.fits_alone(most):
            self._refuse_size(req, len(cands), most)
        if info is not None:
            info.model, info.user, info.stream = req.model, req.user, req.stream
            info.prompt_tokens = sum(len(p.token_ids) for p in prompts)
            if self.key_limiter.enabled:   # each prompt once, plus every token its candidates may generate
                generated = most - sum(len(c.prompt.token_ids) for c in cands)
                self.key_limiter.charge(info.key_id, info.prompt_tokens + generated)
            info.ticket = self.admission.admit(len(cands), most)
        return cands, params

    def _most_tokens(self, prompt_len: int, max_tokens: int | None) -> int:
        """The most tokens one engine request can come to hold: its prompt and every token it may generate."""
        if max_tokens is None:
            return self.max_model_len
        return min(prompt_len + max_tokens, self.max_model_len)

    def _refuse_size(self, req: CompletionRequest, sequences: int, tokens: int) -> None:
        """A 400 for a request that could need more KV cache than the server ever lets requests claim at once."""
        name = ("max_tokens" if sequences == 1 else "prompt" if len(req.prompts) > 1 and req.best_of == 1
                else "best_of" if req.best_of > req.n else "n")
        raise invalid(f"This request is too large for this server: its {sequences} completion(s) could need up to "
                      f"{tokens} tokens of KV cache (prompt plus max_tokens each), and the server lets the requests "
                      f"in flight claim at most {self.admission.max_kv_tokens}. Please lower max_tokens, n, "
                      "best_of or the number of prompts.", param=name, code="invalid_value")

    # ----- running -------------------------------------------------------------------------------

    async def _run(self, cand: Candidate, params: SamplingParams, on_update=None,
                   info: RequestInfo | None = None) -> None:
        """Drive one candidate to its end, feeding its text; stops early on a stop sequence."""
        last_token_at = None
        try:
            stream = self.engine.generate(cand.engine_id, cand.prompt.token_ids, params)
            async for out in stream:
                if out.new_token_ids and info is not None:
                    last_token_at = self._observe_tokens(info, last_token_at, len(out.new_token_ids))
                cand.prompt_logprobs.extend(out.prompt_logprobs)
                cand.logprobs.extend(out.logprobs)
                cand.num_generated += len(out.new_token_ids)
                cand.num_cached_tokens = out.num_cached_tokens
                cand.text.add(out.new_token_ids)
                if cand.text.stopped_at is not None:
                    cand.finish_reason = "stop"
                elif out.finished:
                    cand.finish_reason = "length" if out.finish_reason == "length" else "stop"
                if on_update is not None:
                    on_update(cand)
                if cand.finish_reason is not None:
                    break
            await stream.aclose()
        except ValueError as exc:   # the engine refused it: a request that can never run
            raise invalid(str(exc)) from exc

    def _observe_tokens(self, info: RequestInfo, last_token_at: float | None, count: int) -> float:
        """Record time to first token / per-token latency of one candidate's new tokens; returns now."""
        now = time.monotonic()
        if info.first_token_at is None:
            info.first_token_at = now
        if self.metrics is not None:
            if last_token_at is None:
                self.metrics.time_to_first_token.observe(now - info.arrival)
                count -= 1
            if count > 0 and last_token_at is not None:
                for _ in range(count):
                    self.metrics.inter_token_latency.observe((now - last_token_at) / count)
        return now

    async def complete(self, req: CompletionRequest, info: RequestInfo | None = None) -> dict:
        info = info or RequestInfo()
        cands: list[Candidate] = []
        try:
            cands, params = self._candidates(req, info)
            await _gather_all(self._run(c, p, info=info) for c, p in zip(cands, params))
        finally:
            info.release()
            info.completion_tokens = sum(c.num_generated for c in cands)
        if self._injected_fault(req):
            raise RuntimeError("injected fault")
        chosen = self._choose(req, cands)
        choices = [self._choice(req, c, (0, c.text.releasable(True)), (0, c.text.tokens_before(
            len(c.text.final_text), True)), final=True, with_echo=req.echo) for c in chosen]
        body = self._envelope(req, _new_id(), int(time.time()), choices)
        body["usage"] = self._usage(cands)
        return body

    def _choose(self, req: CompletionRequest, cands: list[Candidate]) -> list[Candidate]:
        """Per prompt, the n candidates with the highest mean token log-probability, in rank order."""
        if req.best_of == req.n:
            return cands
        chosen = []
        for start in range(0, len(cands), req.best_of):
            group = sorted(cands[start:start + req.best_of], key=Candidate.mean_logprob, reverse=True)[:req.n]
            for j, c in enumerate(group):
                c.index = c.prompt.index * req.n + j
                chosen.append(c)
        return chosen

    async def stream(self, req: CompletionRequest, info: RequestInfo | None = None) -> AsyncIterator[dict]:
        """Validate first (errors raise here, before any chunk), then return the chunk iterator.

        The iterator releases the request's queue place when it ends; if it is never iterated, the
        caller must call info.release()."""
        info = info or RequestInfo()
        cands, params = self._candidates(req, info)
        return self._chunks(req, cands, params, info)

    async def _chunks(self, req: CompletionRequest, cands: list[Candidate],
                      params: list[SamplingParams], info: RequestInfo) -> AsyncIterator[dict]:
        completion_id, created = _new_id(), int(time.time())
        updates: asyncio.Queue = asyncio.Queue()

        async def run(cand: Candidate, p: SamplingParams) -> None:
            try:
                await self._run(cand, p, updates.put_nowait, info)
                updates.put_nowait(_DONE)
            except BaseException as exc:   # noqa: BLE001 - handed to the consumer, which re-raises
                updates.put_nowait(exc)
                raise

        tasks = [asyncio.create_task(run(c, p)) for c, p in zip(cands, params)]
        try:
            remaining = len(tasks)
            while remaining:
                item = await updates.get()
                if isinstance(item, BaseException):
                    raise item
                if item is _DONE:
                    remaining -= 1
                    continue
                chunk = self._delta(req, item)
                if chunk is not None:
                    yield self._stream_envelope(req, completion_id, created, [chunk])
                    if self._injected_fault(req):
                        raise RuntimeError("injected fault")
            if req.include_usage:
                body = self._envelope(req, completion_id, created, [])
                body["usage"] = self._usage(cands)
                yield body
        finally:
            for task in tasks:
                task.cancel()
            info.release()
            info.completion_tokens = sum(c.num_generated for c in cands)   # also when it ended early

    def _delta(self, req: CompletionRequest, cand: Candidate) -> dict | None:
        """The next chunk of one choice: the text and tokens released since the last one, if any."""
        finished = cand.finish_reason is not None
        if cand.sent_final:
            return None
        echo_now = req.echo and not cand.sent_echo
        if echo_now and req.logprobs is not None and not finished and \
                len(cand.prompt_logprobs) < len(cand.prompt.token_ids) - 1:
            return None   # the echoed prompt goes out once all its logprobs are in
        chars = cand.text.releasable(finished)
        tokens = cand.text.tokens_before(chars, finished)
        if chars == cand.sent_chars and tokens == cand.sent_tokens and not finished and not echo_now:
            return None
        choice = self._choice(req, cand, (cand.sent_chars, chars), (cand.sent_tokens, tokens), finished, echo_now)
        cand.sent_echo, cand.sent_chars, cand.sent_tokens, cand.sent_final = True, chars, tokens, finished
        return choice

    # ----- building responses ------------------------------------------------------------------------

    def _choice(self, req: CompletionRequest, cand: Candidate, chars: tuple[int, int], tokens: tuple[int, int],
                final: bool, with_echo: bool) -> dict:
        """A choice object over generated characters [chars) and tokens [tokens), the prompt first if echoing."""
        text = cand.text.final_text[chars[0]:chars[1]]
        if with_echo:
            text = cand.prompt.text + text
        logprobs = self._logprobs(req, cand, *tokens, with_echo) if req.logprobs is not None else None
        return {"text": text, "index": cand.index, "logprobs": logprobs,
                "finish_reason": cand.finish_reason if final else None}

    def _logprobs(self, req: CompletionRequest, cand: Candidate, first: int, last: int, with_echo: bool) -> dict:
        k = req.logprobs
        tokens, token_logprobs, top, offsets = [], [], [], []
        prompt_len = len(cand.prompt.text)
        if with_echo:
            position = 0
            for i in cand.prompt.echoed_positions:
                piece = self.tokenizer.decode([cand.prompt.token_ids[i]])
                tokens.append(piece)
                offsets.append(min(position, prompt_len))
                position += len(piece)
                entry = cand.prompt_logprobs[i - 1] if 0 < i <= len(cand.prompt_logprobs) else None
                token_logprobs.append(entry.logprob if entry else None)
                top.append(self._top(entry, k) if entry else None)
        for i in range(first, last):
            entry = cand.logprobs[i]
            tokens.append(self.tokenizer.decode([entry.token_id]))
            token_logprobs.append(entry.logprob)
            top.append(self._top(entry, k))
            offsets.append(prompt_len + cand.text.token_starts[i])
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}

    def _top(self, entry: TokenLogprob, k: int) -> dict[str, float]:
        top = {self.tokenizer.decode([t]): lp for t, lp in entry.top[:k]}
        top.setdefault(self.tokenizer.decode([entry.token_id]), entry.logprob)
        return top

    def _usage(self, cands: list[Candidate]) -> dict:
        """Each prompt counted once; a prompt's cached tokens are the most any of its candidates reused."""
        by_prompt: dict[int, list[Candidate]] = {}
        for c in cands:
            by_prompt.setdefault(c.prompt.index, []).append(c)
        prompt_tokens = sum(len(group[0].prompt.token_ids) for group in by_prompt.values())
        cached = sum(max(c.num_cached_tokens for c in group) for group in by_prompt.values())
        completion_tokens = sum(c.num_generated for c in cands)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def _envelope(self, req: CompletionRequest, completion_id: str, created: int, choices: list[dict]) -> dict:
        return {"id": completion_id, "object": "text_completion", "created": created, "model": req.model,
                "system_fingerprint": self.fingerprint, "choices": sorted(choices, key=lambda c: c["index"])}

    def _stream_envelope(self, req, completion_id, created, choices) -> dict:
        body = self._envelope(req, completion_id, created, choices)
        if req.include_usage:
            body["usage"] = None
        if req.include_obfuscation:
            body["obfuscation"] = secrets.token_urlsafe(8)
        return body


FAULT_USER = "textcomplete-test:inject-fault"   # with fault injection on, such a request fails mid-way
_DONE = object()   # a candidate's end, on the stream's update queue


def _new_id() -> str:
    return "cmpl-" + uuid.uuid4().hex


async def _gather_all(coroutines) -> None:
    """Run all; on the first failure cancel the rest (their engine requests are aborted) and re-raise."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
