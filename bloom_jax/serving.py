"""An OpenAI-compatible completions API over a `decoding.Generator`, batching what arrives together.

`Engine` owns the model: one thread takes requests from a bounded queue, decodes those waiting
(up to `max_batch`) as one batch, and hands each request its text as the tokens come (for
server-sent events) and its end (length, EOS or a stop string). `create_app` is the FastAPI
application: `POST /v1/completions`, `GET /v1/models`, `GET /health`. A bad request gets a 400
naming the problem; a full queue gets a 503; a failing batch fails its requests, not the server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import queue
import threading
import time
import uuid
from typing import Any

import fastapi
import numpy as np
import pydantic
from fastapi import responses

from bloom_jax import decoding

OPENAI_ERROR = "invalid_request_error"


class CompletionRequest(pydantic.BaseModel):
    """The fields of OpenAI's `POST /v1/completions` that bloom_jax serves; others are ignored."""

    model: str | None = None
    prompt: str
    max_tokens: int = pydantic.Field(16, ge=1)
    temperature: float = pydantic.Field(1.0, ge=0)  # OpenAI's default; 0 is greedy
    top_p: float = pydantic.Field(1.0, gt=0, le=1)
    top_k: int = pydantic.Field(0, ge=0)  # not OpenAI's; 0 keeps every token
    stop: str | list[str] | None = None
    seed: int = pydantic.Field(0, ge=0, lt=2**32)
    stream: bool = False

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop or [] if s]


@dataclasses.dataclass
class Job:
    """One request on its way through the engine; `events` receives ("text", delta) items and
    one ("end", finish_reason) or ("error", message)."""

    prompt_ids: list[int]
    request: CompletionRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    new_ids: list[int] = dataclasses.field(default_factory=list)
    text: str = ""  # the completion's text so far
    prefix_offset: int = 0  # new_ids[prefix_offset:read_offset] are decoded into `text` last
    read_offset: int = 0
    sent: int = 0  # characters of the completion already sent
    finished: bool = False

    @property
    def longest_stop(self) -> int:
        return max((len(s) for s in self.request.stops), default=1)

    def send(self, *event: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class QueueFull(Exception):
    """The engine holds `max_queue` requests already."""


class Engine:
    """Decodes queued completion jobs in batches on a background thread."""

    def __init__(self, generator: decoding.Generator, params: Any, vocabulary: Any, *,
                 context: int, max_batch: int = 16, max_queue: int = 64,
                 gather_s: float = 0.005):
        self.generator, self.params, self.vocabulary = generator, params, vocabulary
        self.context, self.max_batch, self.gather_s = context, max_batch, gather_s
        self.jobs: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        threading.Thread(target=self._serve_forever, daemon=True, name="engine").start()

    def encode(self, request: CompletionRequest) -> list[int]:
        """The prompt's ids, after checking that it and its completion fit the context."""
        ids = self.vocabulary.encode(request.prompt)
        if not ids:
            raise ValueError("prompt encodes to no tokens; give it some text.")
        if len(ids) + request.max_tokens > self.context:
            raise ValueError(f"the prompt's {len(ids)} tokens plus max_tokens="
                             f"{request.max_tokens} exceed the context of {self.context} tokens; "
                             "shorten the prompt or lower max_tokens.")
        return ids

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull from None

    def _serve_forever(self) -> None:
        while True:
            batch = [self.jobs.get()]
            deadline = time.monotonic() + self.gather_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.jobs.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            try:
                self._decode(batch)
            except Exception as error:  # pylint: disable=broad-except  # fail the batch only
                for job in batch:
                    if not job.finished:
                        job.send("error", f"decoding failed: {error}")

    def _decode(self, batch: list[Job]) -> None:
        """Decodes a batch, shapes rounded up to powers of two so that few programs compile."""
        rows = decoding.power_of_two(len(batch))
        jobs = batch + [batch[0]] * (rows - len(batch))  # copies, decoded and dropped
        pad = self.vocabulary.pad_id
        ids, mask = decoding.left_pad([job.prompt_ids for job in jobs], pad)
        width = decoding.power_of_two(ids.shape[1])
        ids = np.pad(ids, ((0, 0), (width - ids.shape[1], 0)), constant_values=pad)
        mask = np.pad(mask, ((0, 0), (width - mask.shape[1], 0)))
        new_tokens = decoding.power_of_two(max(job.request.max_tokens for job in batch))
        limits = decoding.Limits(new_tokens, self.vocabulary.eos_id, self.vocabulary.pad_id)
        sampling = decoding.stack_sampling([
            decoding.Sampling(job.request.temperature, job.request.top_k, job.request.top_p)
            for job in jobs])
        keys = decoding.row_keys([job.request.seed for job in jobs], [0] * rows)
        state = self.generator.start(limits, self.params, ids, mask, keys, sampling)
        for step in range(limits.max_new_tokens):
            if step:
                state = self.generator.advance(limits, self.params, state)
            tokens = np.asarray(state.token)
            for job, token in zip(batch, tokens):
                if not job.finished:
                    self._append(job, int(token))
            if all(job.finished for job in batch):
                return

    def _append(self, job: Job, token: int) -> None:
        """Adds a token to a job, sends the text that is final, and ends the job when done."""
        if token == self.vocabulary.eos_id:
            return self._end(job, "stop")
        job.new_ids.append(token)
        last = len(job.new_ids) == job.request.max_tokens
        if not (last or job.request.stream or job.request.stops):
            return None  # nothing to send or check before the end: the text is decoded then
        checked = max(0, len(job.text) - job.longest_stop + 1)  # where a new stop could start
        self._detokenize(job)
        stops = [i for i in (job.text.find(s, checked) for s in job.request.stops) if i >= 0]
        if stops:
            job.text = job.text[:min(stops)]
            return self._end(job, "stop", flush=False)
        if last:
            return self._end(job, "length")
        final = len(job.text) - job.longest_stop + 1  # what a stop string could still claim
        if final > job.sent:
            job.send("text", job.text[job.sent:final])
            job.sent = final

    def _detokenize(self, job: Job, flush: bool = False) -> None:
        """Appends the text of the job's new tokens to `job.text`, decoding only the last few
        (vLLM's incremental detokenization): the tokens since the last read, after a few
        already read (so that a word's leading space comes out as in the whole text). Holds
        back a character cut mid-way unless `flush`."""
        ids = job.new_ids
        before = self.vocabulary.decode(ids[job.prefix_offset:job.read_offset])
        after = self.vocabulary.decode(ids[job.prefix_offset:])
        if len(after) > len(before) and (flush or not after.endswith("\ufffd")):
            job.text += after[len(before):]
            job.prefix_offset, job.read_offset = job.read_offset, len(ids)

    def _end(self, job: Job, reason: str, flush: bool = True) -> None:
        """Sends the rest of the job's text (its last tokens decoded, unless cut at a stop
        string) and its end."""
        if flush:
            self._detokenize(job, flush=True)
        if len(job.text) > job.sent:
            job.send("text", job.text[job.sent:])
        job.finished = True
        job.send("end", reason, len(job.new_ids))


def _error(status: int, message: str) -> responses.JSONResponse:
    return responses.JSONResponse({"error": {"message": message, "type": OPENAI_ERROR}}, status)


def create_app(engine: Engine, model_name: str) -> fastapi.FastAPI:
    """The HTTP API over `engine`."""
    app = fastapi.FastAPI(title="bloom_jax")

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list",
                "data": [{"id": model_name, "object": "model", "owned_by": "bloom_jax"}]}

    @app.post("/v1/completions")
    async def completions(http_request: fastapi.Request):
        try:
            request = CompletionRequest.model_validate_json(await http_request.body())
            decoding.Sampling(request.temperature, request.top_k, request.top_p)
            job = Job(engine.encode(request), request, asyncio.get_running_loop(),
                      asyncio.Queue())
        except pydantic.ValidationError as error:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}"
                                 for e in error.errors())
            return _error(400, f"bad request: {problems}")
        except ValueError as error:
            return _error(400, str(error))
        try:
            engine.submit(job)
        except QueueFull:
            return _error(503, "the server's queue is full; retry later.")
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": model_name}
        if request.stream:
            return responses.StreamingResponse(_stream(job, head), media_type="text/event-stream")
        text = []
        try:
            async for kind, *value in _events(job):
                if kind == "text":
                    text.append(value[0])
                else:
                    reason, completion_tokens = value
        except RuntimeError as error:
            return _error(500, str(error))
        usage = {"prompt_tokens": len(job.prompt_ids), "completion_tokens": completion_tokens,
                 "total_tokens": len(job.prompt_ids) + completion_tokens}
        return {**head, "choices": [_choice("".join(text), reason)], "usage": usage}

    return app


def _choice(text: str, finish_reason: str | None) -> dict:
    return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}


async def _events(job: Job):
    """The job's events up to its end; an engine error is raised as a RuntimeError."""
    while True:
        kind, *value = await job.events.get()
        if kind == "error":
            raise RuntimeError(value[0])
        yield (kind, *value)
        if kind == "end":
            return


async def _stream(job: Job, head: dict):
    """Server-sent events as OpenAI sends them: one chunk per piece of text, then [DONE]."""
    async for kind, *value in _events(job):
        choice = _choice(value[0], None) if kind == "text" else _choice("", value[0])
        yield f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"
    yield "data: [DONE]\n\n"
