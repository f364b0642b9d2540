"""The HTTP API (Starlette): OpenAI-compatible completions and chat completions, models, health, metrics.

Every request is validated before it reaches the engine (body size, JSON, field types and ranges,
model name, prompt length), so a bad request is answered on its own and never disturbs the batch.
A client that goes away (mid-stream or while waiting for a non-streamed answer) is detected and
its sequence released at once, which frees its cache blocks before the next step.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import dataclasses
import hmac
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from dsv3.core.errors import RequestError
from dsv3.core.sampling import SamplingParams, choice_seed, generation_defaults
from dsv3.core.tokenizer import TemplateLimitError, Tokenizer
from dsv3.serve import chat as chat_requests
from dsv3.serve import protocol as P
from dsv3.serve.worker import Accepted, Failed


@dataclass(frozen=True)
class ServeOptions:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    max_prompt_tokens: int | None = None     # None: what the context and the cache allow
    header_timeout_s: float = 10.0           # a connection's request headers must arrive within this
    body_timeout_s: float = 30.0             # and its body within this, once the headers are in
    stuck_after_s: float = 120.0             # /health answers 503 when one engine step runs longer


_json = msgspec.json.Encoder().encode      # SSE chunks: UTF-8 JSON as json.dumps(ensure_ascii=False) writes it


class _ClientGone(Exception):
    """The client hung up while its request body was being read: there is nobody to answer."""


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc keeps it otherwise): tokenizing a multi-MB prompt
    leaves hundreds of MB of free but resident arena pages behind."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


_LIBC = None
with contextlib.suppress(OSError, AttributeError, TypeError):
    _LIBC = ctypes.CDLL(ctypes.util.find_library("c"))
    _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]


class _Disconnected:
    """Put in a request's event queue when its client goes away."""


class _Tagged:
    """A choice's event queue as the engine side sees it: its events go, with its index, into the
    queue that all choices of a request share."""

    def __init__(self, queue: asyncio.Queue, index: int):
        self._queue, self._index = queue, index

    def put_nowait(self, event) -> None:
        self._queue.put_nowait((self._index, event))


def _merge(a: dict, b: dict) -> dict:
    """Two stream deltas as one: text fields joined, tool_calls lists concatenated."""
    out = dict(a)
    for key, value in b.items():
        out[key] = out[key] + value if key in out else value
    return out


def _join_logprobs(parts: list[dict]) -> dict:
    """Several chunks' logprobs objects (chat or legacy completions) as one: every list in order."""
    return {key: [x for p in parts for x in p[key]] if isinstance(value, list) else value
            for key, value in parts[0].items()}


def _error(e: P.APIError, metrics=None) -> JSONResponse:
    if metrics is not None:
        metrics.http_errors.labels(str(e.status)).inc()
    headers = {"Retry-After": "1"} if e.status == 503 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


@dataclass(frozen=True)
class ServedModel:
    """What the HTTP side needs of the model it serves: the tokenizer and the engine's limits. The
    engine itself may run in this process (EngineWorker) or in its own (EngineProcess)."""
    path: Path
    tokenizer: Tokenizer | None
    vocab_size: int
    max_context: int           # max_position_embeddings
    capacity_tokens: int       # latent-cache slots
    reserve: int               # slots per sequence that speculative decoding keeps free
    backend: str

    @classmethod
    def of(cls, llm) -> "ServedModel":
        e = llm.engine
        return cls(llm.path, llm.tokenizer, llm.config.vocab_size, e.max_context, e.capacity_tokens, e.reserve,
                   llm.spec.name)


def create_app(model: ServedModel, worker, options: ServeOptions) -> Starlette:
    """The ASGI app serving `model` through `worker` (an EngineWorker or an EngineProcess)."""
    tok, metrics = model.tokenizer, worker.metrics
    if tok is None:
        raise RequestError(f"{model.path} has no tokenizer.json; the server needs the checkpoint's tokenizer")
    # Longest prompt + output a request may ask for: the model's context, and the cache (minus the
    # slots speculative decoding reserves), since one request must fit the cache on its own.
    context = min(model.max_context, model.capacity_tokens - model.reserve)
    max_prompt = min(options.max_prompt_tokens or context - 1, context - 1)
    # No token is longer than max_token_bytes, so text over this many bytes cannot fit max_prompt
    # tokens: refused before it is tokenized (which costs seconds and hundreds of MB for megabytes).
    max_prompt_bytes = (max_prompt + 1) * tok.max_token_bytes
    created = int(time.time())
    defaults = generation_defaults(model.path)     # the checkpoint's sampling values, for unset fields
    token_texts = P.TokenTexts(tok)                # logprobs' token strings and bytes, cached per id
    # Tokenizing and template rendering run off the event loop, on threads of their own: a slow one
    # (a long prompt, a template at its time bound) never delays the engine's events or other requests.
    tokenize_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="dsv3-tokenize")

    async def off_loop(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(tokenize_pool, fn, *args)

    def check_prompt_bytes(nbytes: int, param: str) -> None:
        if nbytes > max_prompt_bytes:
            raise P.APIError(400, f"the prompt is {nbytes} bytes of text, more than {max_prompt} tokens can hold "
                                  f"(this server accepts at most {max_prompt} prompt tokens, context {context}); "
                                  f"shorten it", param=param, code="context_length_exceeded")

    def authorize(request: Request) -> None:
        if options.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), options.api_key.encode()):
            raise P.APIError(401, "missing or wrong API key: send the header `Authorization: Bearer <key>` "
                                  "with the key the server was started with (--api-key)",
                             code="invalid_api_key")

    async def read_body(request: Request) -> bytes:
        limit = options.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise P.APIError(413, f"request body is {declared} bytes; the limit is {limit} (--max-body-bytes)")
        chunks, size = [], 0

        async def read() -> None:
            nonlocal size
            async for chunk in request.stream():        # also bounds chunked bodies with no length header
                size += len(chunk)
                if size > limit:
                    raise P.APIError(413, f"request body exceeds {limit} bytes (--max-body-bytes)")
                chunks.append(chunk)
        try:
            await asyncio.wait_for(read(), options.body_timeout_s)
        except asyncio.TimeoutError:
            raise P.APIError(408, f"the request body did not arrive within {options.body_timeout_s:g} s "
                                  f"({size} bytes came); send it at once") from None
        except ClientDisconnect:
            raise _ClientGone() from None
        return b"".join(chunks)

    def check_model(name: str | None) -> None:
        if name is not None and name != options.model_name:
            raise P.APIError(404, f"model {name!r} does not exist; this server serves {options.model_name!r} "
                                  f"(GET /v1/models)", param="model", code="model_not_found")

    def sampling(req, prompt_len: int, max_tokens: int | None) -> SamplingParams:
        if max_tokens is None and isinstance(req, P.CompletionRequest):
            max_tokens = min(16, context - prompt_len)    # OpenAI's default for legacy completions
        if prompt_len > max_prompt:
            raise P.APIError(400, f"the prompt is {prompt_len} tokens; this server accepts at most {max_prompt} "
                                  f"(context {context}); shorten it", param="messages" if hasattr(req, "messages")
                             else "prompt", code="context_length_exceeded")
        if max_tokens is not None and max_tokens < 1:
            raise P.APIError(400, f"max_tokens = {max_tokens}: must be >= 1", param="max_tokens")
        room = context - prompt_len
        if max_tokens is not None and max_tokens > room:
            raise P.APIError(400, f"this model's context is {context} tokens, but {prompt_len} prompt tokens + "
                                  f"max_tokens {max_tokens} exceed it; lower max_tokens to at most {room}",
                             param="max_tokens", code="context_length_exceeded")
        # unset sampling values: the checkpoint's generation_config.json, else OpenAI's defaults
        temperature = req.temperature if req.temperature is not None else defaults.get("temperature", 1.0)
        top_p = req.top_p if req.top_p is not None else defaults.get("top_p", 1.0)
        top_k = req.top_k if req.top_k is not None else defaults.get("top_k", 0)
        repetition = req.repetition_penalty if req.repetition_penalty is not None else defaults.get(
            "repetition_penalty", 1.0)
        bias, stop_ids = req.logit_bias_pairs(), tuple(req.stop_token_ids or ())
        for key, ids in (("logit_bias", [t for t, _ in bias]), ("stop_token_ids", stop_ids)):
            bad = [t for t in ids if not 0 <= t < model.vocab_size]
            if bad:
                raise P.APIError(400, f"{key}: token id {bad[0]} is outside the vocabulary [0, {model.vocab_size})",
                                 param=key)
        try:
            return SamplingParams(
                max_new_tokens=max_tokens or room, temperature=temperature, top_p=top_p,
                top_k=0 if top_k == -1 else top_k, seed=req.seed, stop=P.stop_list(req.stop),
                ignore_eos=req.ignore_eos, presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty, repetition_penalty=repetition, logit_bias=bias,
                min_tokens=req.min_tokens, stop_token_ids=stop_ids)
        except RequestError as e:
            raise P.APIError(400, str(e), param=str(e).split(" ", 1)[0]) from None

    def check_ids(ids: list[int]) -> None:
        vocab = model.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise P.APIError(400, f"prompt token {bad[0]} is outside the vocabulary [0, {vocab})", param="prompt")

    async def watch_disconnect(request: Request, h) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        h.events.put_nowait(_Disconnected())

    async def submit_all(prompts: list[list[int]], params: list[list[SamplingParams]]) -> list:
        """Queue every choice of every prompt; a refusal of any aborts the others and is the answer."""
        handles = []
        try:
            for ids, choices in zip(prompts, params):
                group = worker.submit_choices(ids, choices)
                handles += group
                for h in group:
                    first = await h.events.get()
                    if isinstance(first, Failed):
                        raise P.APIError(first.status, first.message, first.type, code=first.code)
                    assert isinstance(first, Accepted)
        except BaseException:
            for h in handles:
                worker.abort(h)
            raise
        return handles

    async def merged_events(request: Request, handles: list):
        """Lists of (choice index, event): everything queued for the request's choices when it wakes,
        so a stream whose client is behind catches up in one write. Until each choice has had its
        final event; all are aborted if the client leaves or one of them fails (the list ends there)."""
        queue: asyncio.Queue = asyncio.Queue()
        for k, h in enumerate(handles):
            held, h.events = h.events, _Tagged(queue, k)
            while not held.empty():          # what arrived before the swap (no await in between)
                queue.put_nowait((k, held.get_nowait()))
        watcher = asyncio.create_task(watch_disconnect(request, handles[0]))
        remaining = len(handles)
        try:
            while remaining:
                batch = [await queue.get()]
                while not queue.empty():
                    batch.append(queue.get_nowait())
                for i, (k, ev) in enumerate(batch):
                    if isinstance(ev, _Disconnected):
                        return
                    if isinstance(ev, Failed) or ev.finish_reason is not None:
                        handles[k].done = True
                        remaining -= 1
                    if isinstance(ev, Failed):
                        yield batch[: i + 1]
                        return
                yield batch
        finally:
            watcher.cancel()
            for h in handles:
                worker.abort(h)      # no-op when finished; frees the blocks of an abandoned choice

    def sse(obj) -> bytes:
        return b"data: " + _json(obj) + b"\n\n"

    async def generate(request: Request, req, prompt_ids: list, chat: bool, output=None, grammar=None,
                       new_output=None, prompt_texts: list | None = None) -> Response:
        """`prompt_ids`: a chat's prompt ids, or a list of completion prompts' ids (`prompt_texts`:
        their text where given as text, for echo). n choices per prompt; choice j of prompt i is
        `index` i * n + j, its seed derived from (seed, j). `output` (a ChatOutput) reads a chat answer
        back into reasoning, content and tool calls (`new_output()` makes one for each further
        choice); `grammar` constrains it (structured output, a required tool call)."""
        prompts = [prompt_ids] if chat else prompt_ids
        n = req.n
        max_tokens = req.max_completion_tokens if chat and req.max_completion_tokens is not None else req.max_tokens
        logprobs = ((req.top_logprobs or 0) if req.logprobs else None) if chat else req.logprobs
        echo = not chat and req.echo
        params = []
        for ids in prompts:
            base = dataclasses.replace(sampling(req, len(ids), max_tokens), logprobs=logprobs,
                                       prompt_logprobs=logprobs if echo else None)
            if grammar is not None:
                try:
                    base = dataclasses.replace(base, grammar=grammar)
                except RequestError as e:           # a sampling field the grammar rules out (min_tokens)
                    raise P.APIError(400, str(e), param=str(e).split(" ", 1)[0]) from None
            params.append([dataclasses.replace(base, seed=choice_seed(base.seed, j)) for j in range(n)])
        handles = await submit_all(prompts, params)
        rid = P.new_id("chatcmpl" if chat else "cmpl")
        model, t0 = options.model_name, int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        outputs = [output] + [new_output() for _ in range(n - 1)] if output is not None else [None] * n
        texts = token_texts if logprobs is not None else None
        echoed = [(prompt_texts[i] if prompt_texts and prompt_texts[i] is not None
                   else await off_loop(tok.decode, prompts[i])) if echo else "" for i in range(len(prompts))]
        first_seen, offsets = [False] * len(handles), [0] * len(handles)

        def entries_of(k: int, ev) -> tuple[list[int], list]:
            """The token ids and logprob entries an event brings for choice k (echo: the prompt's first)."""
            ids, entries = [t for t, *_ in ev.logprobs or []], [tuple(e) for _, *e in ev.logprobs or []]
            if echo and not first_seen[k]:
                prompt = prompts[k // n]
                ids, entries = prompt + ids, [None] + [tuple(e) for e in ev.prompt_logprobs or []] + entries
            return ids, entries

        def usage(finals: list) -> dict:
            return P.usage(sum(len(p) for p in prompts), sum(f.completion_tokens for f in finals),
                           sum(finals[i * n].cached_tokens for i in range(len(prompts))))

        def chat_choice_end(k: int, finish_reason: str | None) -> str | None:
            o = outputs[k]
            return "tool_calls" if o is not None and o.called and finish_reason == "stop" else finish_reason

        if not req.stream:
            pieces, finals = [[] for _ in handles], [None] * len(handles)
            token_ids, entries = [[] for _ in handles], [[] for _ in handles]
            async for batch in merged_events(request, handles):
                for k, ev in batch:
                    if isinstance(ev, Failed):
                        return _error(P.APIError(ev.status, ev.message, ev.type, code=ev.code), metrics)
                    pieces[k].append(ev.text)
                    if logprobs is not None and (ev.logprobs or (echo and not first_seen[k])):
                        ids, es = entries_of(k, ev)
                        token_ids[k] += ids
                        entries[k] += es
                        first_seen[k] = True
                    finals[k] = ev
            if any(f is None or f.finish_reason is None for f in finals):   # the client left; nobody reads this
                return Response(status_code=499)
            choices = []
            for k, final in enumerate(finals):
                text = echoed[k // n] + "".join(pieces[k])
                if chat:
                    lp = P.chat_logprobs(texts, token_ids[k], entries[k]) if texts else None
                    choice = P.chat_body(rid, model, text, final.finish_reason, {}, k, lp)["choices"][0]
                    if outputs[k] is not None:
                        outputs[k].feed(text)
                        outputs[k].finish()
                        choice["message"] = outputs[k].message()
                        choice["finish_reason"] = chat_choice_end(k, final.finish_reason)
                else:
                    lp = P.completion_logprobs(texts, token_ids[k], entries[k]) if texts else None
                    choice = P.completion_body(rid, model, text, final.finish_reason, {}, k, lp)["choices"][0]
                choices.append(choice)
            body = (P.chat_body if chat else P.completion_body)(rid, model, "", None, usage(finals))
            body["choices"] = choices
            return JSONResponse(body)

        def chunk(k: int, events: list) -> bytes:
            """One chunk for choice k's events (in order) that were queued together: their text joined,
            their logprobs entries concatenated, the last one's finish_reason. Tokens show as a chunk
            even while their text is held back (a possible stop string, an incomplete UTF-8
            character): clients see progress."""
            pieces, lps = [], []
            for ev in events:
                if texts is not None:
                    ids, es = entries_of(k, ev)
                    lps.append(P.chat_logprobs(texts, ids, es) if chat
                               else P.completion_logprobs(texts, ids, es, offsets[k]))
                text = ev.text if first_seen[k] else echoed[k // n] + ev.text
                first_seen[k] = True
                offsets[k] += len(text)
                pieces.append(text)
            text, finish_reason = "".join(pieces), events[-1].finish_reason
            lp = lps[0] if len(lps) == 1 else _join_logprobs(lps) if lps else None
            if not chat:
                return sse(P.completion_chunk(rid, model, t0, text, finish_reason, k, lp))
            delta = {"content": text} if text or finish_reason is None else {}
            o = outputs[k]
            if o is not None:
                delta = _merge(o.feed(text) if text else {}, o.finish() if finish_reason is not None else {})
                if not delta and finish_reason is None:
                    delta = {"content": ""}                   # progress: tokens came, no text yet
            return sse(P.chat_chunk(rid, model, t0, delta, chat_choice_end(k, finish_reason), k, lp))

        async def stream():
            finals = [None] * len(handles)
            if chat:
                yield b"".join(sse(P.chat_chunk(rid, model, t0, {"role": "assistant", "content": ""}, index=k))
                               for k in range(len(handles)))
            async for batch in merged_events(request, handles):
                by_choice: dict[int, list] = {}
                failed = None
                for k, ev in batch:
                    if isinstance(ev, Failed):       # always the batch's last event
                        failed = ev
                        break
                    if ev.finish_reason is not None:
                        finals[k] = ev
                    if ev.text or ev.finish_reason or ev.num_tokens:
                        by_choice.setdefault(k, []).append(ev)
                out = [chunk(k, events) for k, events in by_choice.items()]
                if failed is not None:       # headers are sent: report in-band, as OpenAI does
                    yield b"".join(out) + sse(P.APIError(failed.status, failed.message, failed.type,
                                                         code=failed.code).body())
                    return
                if all(f is not None for f in finals):
                    if include_usage:
                        out.append(sse(P.usage_chunk(rid, model, t0, "chat.completion.chunk" if chat
                                                     else "text_completion", usage(finals))))
                    out.append(b"data: [DONE]\n\n")
                if out:
                    yield b"".join(out)       # one write per wake-up, however many steps it covers

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def handle(request: Request, schema, chat: bool) -> Response:
        try:
            authorize(request)
            if not worker.alive:
                raise P.APIError(503, "the server is shutting down; retry on another instance", "server_error")
            body = await read_body(request)
            req = P.parse(schema, body)
            check_model(req.model)
            output = grammar = None
            if chat:
                plan = chat_requests.plan_request(req, tok)
                messages = plan.messages
                check_prompt_bytes(sum(len((m["content"] or "").encode()) for m in messages)
                                   + len(json.dumps([m.get("tool_calls") for m in messages] + [plan.tools],
                                                    ensure_ascii=False).encode()), "messages")
                try:
                    prompt_text, prompt_ids = await off_loop(tok.chat_prompt, messages, plan.tools,
                                                             plan.template_kwargs)
                except TemplateLimitError as e:
                    raise P.APIError(400, f"messages: {e}", param="messages") from None
                except Exception as e:  # noqa: BLE001 - the template raises for conversations it rejects
                    raise P.APIError(400, f"messages: the chat template rejected them ({e})", param="messages")
                output, grammar = plan.output(tok, prompt_text)
            else:
                prompt_ids, prompt_texts = [], []
                for prompt in req.prompts():
                    if isinstance(prompt, str):
                        check_prompt_bytes(len(prompt.encode()), "prompt")
                        prompt_ids.append(await off_loop(tok.encode, prompt))
                        prompt_texts.append(prompt)
                    else:
                        check_ids(prompt)
                        prompt_ids.append(list(prompt))
                        prompt_texts.append(None)
            if len(body) >= 1 << 20:
                await off_loop(_malloc_trim)
            if chat:
                return await generate(request, req, prompt_ids, chat, output, grammar,
                                      new_output=lambda: plan.output(tok, prompt_text)[0])
            return await generate(request, req, prompt_ids, chat, prompt_texts=prompt_texts)
        except chat_requests.ChatRequestError as e:
            return _error(P.APIError(400, str(e), param=e.param), metrics)
        except P.APIError as e:
            return _error(e, metrics)
        except _ClientGone:
            return Response(status_code=499)

    async def completions(request: Request) -> Response:
        return await handle(request, P.CompletionRequest, chat=False)

    async def chat_completions(request: Request) -> Response:
        return await handle(request, P.ChatRequest, chat=True)

    async def models(request: Request) -> Response:
        try:
            authorize(request)
        except P.APIError as e:
            return _error(e, metrics)
        return JSONResponse({"object": "list", "data": [
            {"id": options.model_name, "object": "model", "created": created, "owned_by": "dsv3",
             "max_model_len": context}]})

    async def health(request: Request) -> Response:
        if not worker.alive:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        busy = worker.busy_for()
        if busy > options.stuck_after_s:
            return JSONResponse({"status": "stuck", "message": f"one engine step has run for {busy:.0f} s "
                                 f"(limit {options.stuck_after_s:g} s); restart the server"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def prometheus(request: Request) -> Response:
        return Response(await worker.render_metrics(), media_type=CONTENT_TYPE_LATEST)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        msg = {404: f"no route {request.url.path}; see /v1/models, /v1/completions, /v1/chat/completions",
               405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
        return _error(P.APIError(exc.status_code, msg), metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        # uvicorn has stopped accepting connections and waited for the open ones (draining), so the
        # engine is idle unless the drain timed out; stop its thread without blocking the loop.
        await asyncio.to_thread(worker.stop, 30.0)
        tokenize_pool.shutdown(wait=False, cancel_futures=True)

    routes = [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error}, lifespan=lifespan)
