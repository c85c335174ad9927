"""`nanotune serve`: the HTTP side, a Starlette app on uvicorn (the optional extra `serve`).

Routes follow the OpenAI API as vLLM serves it: `/v1/models`, `/v1/completions`,
`/v1/chat/completions` (plain or `stream: true` server-sent events ending in `data: [DONE]`),
`/v1/load_lora_adapter` and `/v1/unload_lora_adapter`, `/health`, and vLLM's `/tokenize`,
`/detokenize` and `/tokenizer_info` (lm-evaluation-harness tokenizes through them). Every
request is checked in `serve.protocol` and then handed to the one `Engine`; every failure is an
OpenAI-style error body, and the server keeps serving after it. Chat requests' `tools` and
`tool_choice` are read, and their replies' calls parsed into `tool_calls`, in `serve.tools`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from nanotune.decoding.engine import BASE, Engine, Event, QueueFull, Sequence
from nanotune.errors import NanotuneError
from nanotune.generate import completion_text
from nanotune.jobs.artifacts import inspect_output
from nanotune.serve import protocol
from nanotune.serve.limits import MAX_BODY
from nanotune.serve.protocol import APIError, Parsed
from nanotune.serve.tools import CallStream, answer, tool_request
from nanotune.tokenizer import Tokenizer


def _imports():
    try:
        import uvicorn
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse, Response, StreamingResponse
        from starlette.routing import Route
    except ImportError as e:
        raise NanotuneError(
            f"nanotune serve needs the 'serve' extra ({e.name} is missing): "
            "pip install 'nanotune[serve]'"
        ) from None
    return uvicorn, Starlette, Request, JSONResponse, Response, StreamingResponse, Route


@dataclass
class Server:
    engine: Engine
    base_name: str
    api_key: str | None = None
    max_body: int = MAX_BODY
    created: int = field(default_factory=protocol.now)

    # ---- which model a request names ----------------------------------------------------

    def resolve(self, name: str) -> tuple[int, Tokenizer]:
        """(adapter id, tokenizer) of a model name; the base for "" or its own name."""
        if not name or name == self.base_name:
            return BASE, self.engine.tokenizer
        adapter = self.engine.adapters.get(name)
        if adapter is None:
            names = ", ".join([self.base_name, *self.engine.adapters])
            raise APIError(404, f"The model '{name}' does not exist (served: {names})", "model")
        return adapter.id, adapter.tokenizer

    def models(self) -> dict[str, Any]:
        ctx = self.engine.context
        data = [self._card(self.base_name, None, ctx)]
        data += [self._card(a.name, self.base_name, ctx) for a in self.engine.adapters.values()]
        return {"object": "list", "data": data}

    def _card(self, name: str, parent: str | None, ctx: int) -> dict[str, Any]:
        return {
            "id": name,
            "object": "model",
            "created": self.created,
            "owned_by": "nanotune",
            "root": name,  # vLLM gives an adapter's folder: a path on the server, kept private
            "parent": parent,
            "max_model_len": ctx,
        }


def create_app(server: Server):
    uvicorn, Starlette, Request, JSONResponse, Response, StreamingResponse, Route = _imports()

    def error(e: APIError) -> Response:
        headers = {"Retry-After": "1"} if e.status in (429, 503) else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    def guarded(handler: Callable[[Any], Awaitable[Response]], auth: bool = True):
        async def endpoint(request):
            try:
                if auth and server.api_key is not None:
                    _check_key(request.headers.get("authorization", ""), server.api_key)
                return await handler(request)
            except APIError as e:
                return error(e)
            except NanotuneError as e:
                return error(APIError(400, str(e)))
            except Exception as e:  # a bug: say so, keep serving
                print(f"nanotune serve: {type(e).__name__}: {e}", file=sys.stderr)
                return error(
                    APIError(500, f"internal error: {type(e).__name__}", kind="server_error")
                )

        return endpoint

    async def body_of(request) -> dict:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > server.max_body:
            raise APIError(
                413, f"request body of {size} bytes is over the limit of {server.max_body}"
            )
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > server.max_body:
                raise APIError(413, f"request body is over the limit of {server.max_body} bytes")
            chunks.append(chunk)
        try:
            # UTF-8 only (RFC 8259): json.loads would take UTF-16 and raw surrogates from bytes.
            text = b"".join(chunks).decode("utf-8")
            body = json.loads(text)
        except ValueError as e:  # UnicodeDecodeError included
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        except RecursionError:
            raise APIError(400, "the request body is nested too deeply") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        protocol.check_text(text, body)
        return body

    async def health(request) -> Response:
        return JSONResponse({"status": "ok", **server.engine.load})

    async def models(request) -> Response:
        return JSONResponse(server.models())

    async def completions(request) -> Response:
        body = await body_of(request)
        adapter, tok = server.resolve(protocol._model(body))
        parsed = protocol.parse_completion(body, tok, server.engine.context)
        return await run(request, parsed, adapter, tok)

    async def chat(request) -> Response:
        body = await body_of(request)
        adapter, tok = server.resolve(protocol._model(body))
        tools = tool_request(body, tok, protocol._model(body) or server.base_name)
        parsed = protocol.parse_chat(body, tok, server.engine.context, tools)
        return await run(request, parsed, adapter, tok)

    async def run(request, parsed: Parsed, adapter: int, tok: Tokenizer) -> Response:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

        def sink(index: int) -> Callable[[Event], None]:
            def put(event: Event) -> None:
                with contextlib.suppress(RuntimeError):  # the loop closed: nobody listens
                    loop.call_soon_threadsafe(queue.put_nowait, (index, event))

            return put

        wanted = len(parsed.prompts) * parsed.n
        if wanted > server.engine.max_queue:  # it never fits: say so before building them all
            raise APIError(
                429,
                f"the request has {wanted} sequences (prompts x n), more than the server queues "
                f"(max_queue={server.engine.max_queue})",
                kind="rate_limit_error",
            )
        seqs = []
        for p, prompt in enumerate(parsed.prompts):
            for j in range(parsed.n):
                i = p * parsed.n + j
                seqs.append(Sequence(prompt, adapter, parsed.sampling[i], tok, sink(i)))
        try:
            server.engine.submit(seqs)
        except QueueFull as e:
            raise APIError(429, str(e), kind="rate_limit_error") from None
        except NanotuneError as e:
            raise APIError(503, str(e), kind="server_error") from None
        answer = _Answer(parsed, seqs, tok, protocol.new_id(parsed.chat), body_model(parsed))
        if parsed.stream:
            return StreamingResponse(
                _sse(answer, queue, seqs),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        watcher = asyncio.create_task(_watch_disconnect(request, seqs))
        try:
            while not answer.done:
                answer.add(*await queue.get())
        finally:
            watcher.cancel()
            for seq in seqs:
                seq.cancelled = True  # a no-op once finished
        if answer.error is not None:
            raise APIError(500, answer.error, kind="server_error")
        return JSONResponse(answer.response())

    def body_model(parsed: Parsed) -> str:
        return parsed.model or server.base_name

    async def load_lora(request) -> Response:
        body = await body_of(request)
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not name:
            raise protocol.bad("lora_name", "is required (the model name requests will use)")
        if not isinstance(path, str) or not path:
            raise protocol.bad("lora_path", "is required (an adapter folder on the server)")
        if name == server.base_name or name in server.engine.adapters:
            raise APIError(400, f"an adapter named {name!r} is already loaded", "lora_name")
        # The resolver every entrance asks: a run directory is read as its final/.
        folder = inspect_output(path).expect("adapter", "lora_path").path
        await asyncio.to_thread(server.engine.load_adapter, name, folder)
        return Response(f"Success: LoRA adapter '{name}' added successfully.", 200)

    async def unload_lora(request) -> Response:
        body = await body_of(request)
        name = body.get("lora_name")
        if not isinstance(name, str) or name not in server.engine.adapters:
            raise APIError(404, f"no adapter named {name!r} is loaded", "lora_name")
        await asyncio.to_thread(server.engine.unload_adapter, name)
        return Response(f"Success: LoRA adapter '{name}' removed successfully.", 200)

    async def tokenize(request) -> Response:
        body = await body_of(request)
        _, tok = server.resolve(protocol._model(body))
        if "messages" in body:
            prompt = protocol.chat_text(body, tok)
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise protocol.bad("prompt", "must be a string")
        tokens = tok.encode(prompt)
        return JSONResponse(
            {"tokens": tokens, "count": len(tokens), "max_model_len": server.engine.context}
        )

    async def detokenize(request) -> Response:
        body = await body_of(request)
        _, tok = server.resolve(protocol._model(body))
        tokens = body.get("tokens")
        if not isinstance(tokens, list):
            raise protocol.bad("tokens", "must be a list of token ids")
        ids = protocol._token_list(tokens, "tokens", tok.vocab_size)
        return JSONResponse({"prompt": tok.decode(ids)})

    async def tokenizer_info(request) -> Response:
        tok = server.engine.tokenizer
        names = {v: k for k, v in tok.special_tokens.items()}
        return JSONResponse(
            {
                "eos_token": names.get(tok.eos_id) if tok.eos_id is not None else None,
                "bos_token": names.get(tok.bos_id)
                if getattr(tok, "bos_id", None) is not None
                else None,
                "pad_token": names.get(tok.pad_id) if tok.pad_id is not None else None,
                "chat_template": tok.chat_template,
                "model_max_length": server.engine.context,
            }
        )

    async def not_found(request, exc) -> Response:
        status = getattr(exc, "status_code", 404)
        return error(APIError(status, f"{request.method} {request.url.path}: {exc.detail}"))

    routes = [
        Route("/health", guarded(health, auth=False), methods=["GET"]),
        Route("/v1/models", guarded(models), methods=["GET"]),
        Route("/v1/completions", guarded(completions), methods=["POST"]),
        Route("/v1/chat/completions", guarded(chat), methods=["POST"]),
        Route("/v1/load_lora_adapter", guarded(load_lora), methods=["POST"]),
        Route("/v1/unload_lora_adapter", guarded(unload_lora), methods=["POST"]),
        Route("/tokenize", guarded(tokenize), methods=["POST"]),
        Route("/detokenize", guarded(detokenize), methods=["POST"]),
        Route("/tokenizer_info", guarded(tokenizer_info), methods=["GET"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app) -> AsyncIterator[None]:
        server.engine.start()
        try:
            yield
        finally:  # uvicorn has let in-flight requests finish by now
            await asyncio.to_thread(server.engine.stop)

    from starlette.exceptions import HTTPException

    return Starlette(
        routes=routes, lifespan=lifespan, exception_handlers={HTTPException: not_found}
    )


def _check_key(header: str, key: str) -> None:
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise APIError(
            401,
            "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
            kind="invalid_request_error",
            code="invalid_api_key",
        )


async def _watch_disconnect(request, seqs: list[Sequence]) -> None:
    """Cancel a plain (non-streaming) request's sequences when its client goes away."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            for seq in seqs:
                seq.cancelled = True
            return


class _Answer:
    """Collects the events of one request's choices into OpenAI's response objects."""

    def __init__(self, parsed: Parsed, seqs: list[Sequence], tok: Tokenizer, rid: str, model: str):
        self.parsed, self.seqs, self.tok, self.id, self.model = parsed, seqs, tok, rid, model
        self.created = protocol.now()
        self.texts = [""] * len(seqs)
        self.tokens: list[list[int]] = [[] for _ in seqs]
        self.scored: list[list] = [[] for _ in seqs]
        self.finish: list[str | None] = [None] * len(seqs)
        self.error: str | None = None
        tools = parsed.tools if parsed.tools is not None and parsed.tools.parses else None
        # Streamed replies whose tool calls are parsed as they arrive, per choice.
        self.calls = [CallStream(tools.prefill) for _ in seqs] if tools is not None else None

    @property
    def done(self) -> bool:
        return all(f is not None for f in self.finish)

    def add(self, index: int, event: Event) -> None:
        self.texts[index] += event.text
        if event.token is not None:
            self.tokens[index].append(event.token)
            if event.logprob is not None:
                self.scored[index].append(event.logprob)
        if event.finish_reason is not None:
            self.finish[index] = event.finish_reason
            if event.error is not None:
                self.error = event.error

    def usage(self) -> dict[str, int]:
        prompt = sum(len(p) for p in self.parsed.prompts)
        # The stop token a choice ended on counts, as vLLM and OpenAI count it.
        made = sum(len(seq.output) + (seq.stop_token is not None) for seq in self.seqs)
        return protocol.usage(prompt, made)

    def _echo(self, index: int) -> str:
        seq = self.seqs[index]
        return self.tok.decode(seq.prompt) if seq.sampling.echo else ""

    def _logprobs(self, index: int) -> dict[str, Any] | None:
        seq = self.seqs[index]
        if seq.sampling.logprobs is None:
            return None
        if self.parsed.chat:
            return protocol.chat_logprobs(self.tok, self.scored[index])
        tokens, scored = list(self.tokens[index]), list(self.scored[index])
        if seq.prompt_logprobs is not None:
            tokens, scored = seq.prompt + tokens, seq.prompt_logprobs + scored
        return protocol.completion_logprobs(self.tok, scored, tokens)

    def response(self) -> dict[str, Any]:
        choices = []
        for i, seq in enumerate(self.seqs):
            # The text exactly as `nanotune generate` returns it: the whole output decoded once.
            text = completion_text(self.tok, seq.output, seq.sampling.stop)
            reason = "stop" if self.finish[i] == "stop" else "length"
            if self.parsed.chat:
                message = {"role": "assistant", "content": text}
                if self.calls is not None:
                    message, called = answer(text, self.parsed.tools)
                    reason = "tool_calls" if called else reason
                choices.append(
                    {
                        "index": i,
                        "message": message,
                        "logprobs": self._logprobs(i),
                        "finish_reason": reason,
                    }
                )
            else:
                choices.append(
                    {
                        "index": i,
                        "text": self._echo(i) + text,
                        "logprobs": self._logprobs(i),
                        "finish_reason": reason,
                    }
                )
        return {
            "id": self.id,
            "object": "chat.completion" if self.parsed.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self.usage(),
        }

    def chunk(self, choices: list[dict[str, Any]], usage: dict | None = None) -> str:
        obj: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.parsed.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if usage is not None:
            obj["usage"] = usage
        return f"data: {json.dumps(obj)}\n\n"

    def delta(self, index: int, event: Event) -> dict[str, Any] | None:
        """One streamed choice piece for an event, or None when it carries nothing."""
        reason = event.finish_reason
        if reason is not None:
            reason = "stop" if reason == "stop" else "length"
        if self.parsed.chat and self.calls is not None:
            return self._tool_delta(index, event, reason)
        if not event.text and reason is None:
            return None
        lp = None
        if event.logprob is not None:
            if self.parsed.chat:
                lp = protocol.chat_logprobs(self.tok, [event.logprob])
            else:
                lp = protocol.completion_logprobs(self.tok, [event.logprob], [event.token])
        if self.parsed.chat:
            delta = {"content": event.text} if event.text else {}
            return {"index": index, "delta": delta, "logprobs": lp, "finish_reason": reason}
        return {"index": index, "text": event.text, "logprobs": lp, "finish_reason": reason}

    def _tool_delta(self, index: int, event: Event, reason: str | None) -> dict[str, Any] | None:
        """A streamed chat piece when tool calls are parsed: text as content, each call whole."""
        stream = self.calls[index]
        delta = stream.feed(event.text)
        if reason is not None:
            for key, value in stream.finish().items():
                delta[key] = delta.get(key, "" if key == "content" else []) + value
            reason = "tool_calls" if stream.calls else reason
        lp = None
        if event.logprob is not None:
            lp = protocol.chat_logprobs(self.tok, [event.logprob])
        if not delta and reason is None and lp is None:
            return None
        return {"index": index, "delta": delta, "logprobs": lp, "finish_reason": reason}


async def _sse(answer: _Answer, queue: asyncio.Queue, seqs: list[Sequence]) -> AsyncIterator[str]:
    """The server-sent events of a streamed request; a client that leaves cancels its
    sequences (Starlette cancels this generator), which frees their cache slots."""
    try:
        if answer.parsed.chat:
            first = [
                {
                    "index": i,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
                for i in range(len(seqs))
            ]
            yield answer.chunk(first)
        else:
            echoed = [
                {"index": i, "text": answer._echo(i), "logprobs": None, "finish_reason": None}
                for i in range(len(seqs))
                if seqs[i].sampling.echo
            ]
            if echoed:
                yield answer.chunk(echoed)
        while not answer.done:
            index, event = await queue.get()
            answer.add(index, event)
            if answer.error is not None:
                err = APIError(500, answer.error, kind="server_error").body()
                yield f"data: {json.dumps(err)}\n\n"
                break
            piece = answer.delta(index, event)
            if piece is not None:
                yield answer.chunk([piece])
        if answer.parsed.include_usage and answer.error is None:
            yield answer.chunk([], answer.usage())
        yield "data: [DONE]\n\n"
    finally:
        for seq in seqs:
            seq.cancelled = True  # a no-op for finished ones


# ---- running it --------------------------------------------------------------------------


def run_server(server: Server, host: str, port: int, announce: Callable[[str], None]) -> None:
    """Serve until SIGINT/SIGTERM; in-flight requests finish first."""
    uvicorn = _imports()[0]
    app = create_app(server)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        raise NanotuneError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    bound = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=None)
    names = ", ".join([server.base_name, *server.engine.adapters])
    announce(f"nanotune serve: http://{host}:{bound}/v1 (models: {names})")
    # uvicorn stops gracefully on SIGINT/SIGTERM (in-flight requests finish), then raises the
    # signal again for the previous handler: ours makes that a clean exit, not a kill.
    previous = {s: signal.signal(s, _stopped) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except _Stopped as e:
        announce(
            f"nanotune serve: stopped by {signal.Signals(e.signum).name}, "
            "in-flight requests finished"
        )
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class _Stopped(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stopped(signum, frame) -> None:
    raise _Stopped(signum)
