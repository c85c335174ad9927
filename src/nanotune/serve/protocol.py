"""The OpenAI API's request checks and response shapes, as `nanotune serve` speaks them.

Requests are plain JSON objects (no schema library): each field is checked by name, and a bad
one raises `APIError` naming it, which the app turns into OpenAI's error body
`{"error": {"message", "type", "param", "code"}}`. Fields the API defines but nanotune does not
implement are refused when set (`suffix`, `audio`, ...); fields it does not know are ignored,
as vLLM does. Extensions shared with vLLM: `top_k`, `repetition_penalty`, `stop_token_ids`.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from nanotune.data.example import BadRow
from nanotune.data.tools import tool_calls
from nanotune.decoding.engine import Sampling, TokenLogprob
from nanotune.tokenizer import Tokenizer

MAX_LOGPROBS = 20
MAX_N = 16
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# Logits divided by a smaller temperature (or scaled by a smaller repetition penalty) can pass
# float32's range and sample from inf/nan; vLLM raises such a temperature to this (one under
# 1e-5 it samples greedily), we refuse it: the client learns to send 0 for greedy.
MIN_TEMPERATURE = 1e-2
MIN_REPETITION_PENALTY = 1e-2


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = (
            status,
            message,
            param,
            kind,
            code,
        )

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code or _CODES.get(self.status),
            }
        }


_CODES = {
    400: "invalid_request",
    401: "invalid_api_key",
    404: "model_not_found",
    413: "request_too_large",
    429: "queue_full",
    503: "unavailable",
}


def bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param)


# ---- field checks ------------------------------------------------------------------------


def _number(body: dict, name: str, default: float, low: float, high: float, *, open_low=False):
    value = body.get(name)
    if value is None:
        return default
    # json.loads takes NaN and Infinity; an int may be too large for a float (isfinite raises).
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (isinstance(value, float) and not math.isfinite(value))
    ):
        raise bad(name, f"must be a finite number, got {value!r}")
    if value < low or value > high or (open_low and value == low):
        lo = "(" if open_low else "["
        raise bad(name, f"must be in {lo}{low}, {high}], got {value}")
    return float(value)


def _int(body: dict, name: str, default: int | None, low: int, high: int | None = None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(name, f"must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        rng = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise bad(name, f"must be an integer {rng}, got {value}")
    return value


def _bool(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(name, f"must be true or false, got {value!r}")
    return value


def _stop(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad("stop", "must be a non-empty string or a list of them")
    return tuple(stops)


def _token_list(value: Any, name: str, vocab: int) -> list[int]:
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise bad(name, "token lists must hold integers only")
    if any(t < 0 or t >= vocab for t in value):
        raise bad(name, f"token ids must be in [0, {vocab})")
    return list(value)


# A lone UTF-16 surrogate reaches a body decoded from UTF-8 only through a \ud800-\udfff escape.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def check_text(raw: str, body: dict) -> None:
    """Refuse a string that is not valid Unicode: a JSON escape can send a lone UTF-16 surrogate
    ("\\ud800"), which neither a tokenizer nor a JSON response can encode. `raw`: the body's
    text, which says whether to look (a walk of every string is for bodies that may have one)."""
    if not _SURROGATE_ESCAPE.search(raw):
        return
    stack: list[tuple[tuple | None, Any]] = [(None, body)]  # (path as (parent, key), value)
    while stack:  # not recursive: json.loads takes nesting nearly as deep as the stack allows
        path, value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                if not _is_text(key):
                    raise bad(_param(path), "has a key that is not valid Unicode")
                stack.append(((path, key), item))
        elif isinstance(value, list):
            stack.extend(((path, i), item) for i, item in enumerate(value))
        elif isinstance(value, str) and not _is_text(value):
            raise bad(_param(path), "is not valid Unicode: it holds a lone UTF-16 surrogate")


def _is_text(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _param(path: tuple | None) -> str:
    """A field's name as errors give it: `messages[0].content`."""
    keys = []
    while path is not None:
        path, key = path
        keys.append(key)
    name = ""
    for key in reversed(keys):
        name += f"[{key}]" if isinstance(key, int) else f".{key}" if name else key
    return name or "body"


def _unsupported(body: dict, *names: str) -> None:
    for name in names:
        if body.get(name) not in (None, False, [], {}):
            raise bad(name, "is not supported by nanotune serve")


def sampling(body: dict, *, vocab: int, max_tokens: int, logprobs: int | None, echo: bool):
    """The sampling fields shared by completions and chat."""
    stop_ids = body.get("stop_token_ids")
    if stop_ids is not None:
        if not isinstance(stop_ids, list):
            raise bad("stop_token_ids", "must be a list of token ids")
        stop_ids = tuple(_token_list(stop_ids, "stop_token_ids", vocab))
    bias = body.get("logit_bias") or {}
    if not isinstance(bias, dict):
        raise bad("logit_bias", "must be an object of token id -> bias")
    pairs = []
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise bad("logit_bias", f"key {key!r} is not a token id") from None
        if not 0 <= token < vocab:
            raise bad("logit_bias", f"token id {token} is not in [0, {vocab})")
        pairs.append((token, _number({"logit_bias": value}, "logit_bias", 0.0, -100, 100)))
    top_k = _int(body, "top_k", 0, -1)
    temperature = _number(body, "temperature", 1.0, 0.0, 100.0)
    if 0 < temperature < MIN_TEMPERATURE:
        raise bad(
            "temperature",
            f"must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {temperature}: a smaller "
            "one overflows the logits",
        )
    return Sampling(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, open_low=True),
        top_k=max(top_k, 0),
        seed=_int(body, "seed", None, -(2**63), 2**63 - 1),  # int64, as vLLM
        stop=_stop(body),
        stop_token_ids=stop_ids,
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, MIN_REPETITION_PENALTY, 100.0),
        logit_bias=tuple(pairs),
        logprobs=logprobs,
        echo=echo,
    )


@dataclass
class Parsed:
    """A checked request: its prompts (token ids), settings and how to answer."""

    model: str
    prompts: list[list[int]]
    sampling: list[Sampling]  # per choice: prompt p's choice j at p * n + j (seeds differ by j)
    n: int
    stream: bool
    include_usage: bool
    chat: bool
    top_logprobs: int | None = None  # chat: alternatives per token, when logprobs is true
    tools: Any = None  # chat: the `serve.tools.ToolRequest` whose calls the answer parses


def _common(body: dict) -> tuple[int, bool, bool]:
    n = _int(body, "n", 1, 1, MAX_N)
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
        raise bad("best_of", "is not supported (only best_of = n)")
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("stream_options", "must be an object")
    usage = bool((options or {}).get("include_usage"))
    return n, stream, usage


def _check_length(prompt: list[int], max_tokens: int, context: int, what: str) -> None:
    if not prompt:
        raise bad(what, "is empty: give at least one token")
    if len(prompt) + max_tokens > context:
        param = what if len(prompt) >= context else "max_tokens"
        raise APIError(
            400,
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{len(prompt) + max_tokens} tokens ({len(prompt)} in the {what}, {max_tokens} in "
            f"the completion). Please reduce the length of the {what} or max_tokens.",
            param,
        )


def _choices(s: Sampling, n: int) -> list[Sampling]:
    """n choices of one prompt: with a seed, choice j samples with seed + j."""
    if n == 1 or s.seed is None:
        return [s] * n
    from dataclasses import replace

    return [replace(s, seed=s.seed + j) for j in range(n)]


def parse_completion(body: dict, tokenizer: Tokenizer, context: int) -> Parsed:
    _unsupported(body, "suffix")
    prompt = body.get("prompt")
    vocab = tokenizer.vocab_size
    if prompt is None:
        raise bad("prompt", "is required")
    if isinstance(prompt, str):
        prompts = [tokenizer.encode(prompt)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = [tokenizer.encode(p) for p in prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        prompts = [_token_list(prompt, "prompt", vocab)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        prompts = [_token_list(p, "prompt", vocab) for p in prompt]
    else:
        raise bad("prompt", "must be a string, a list of strings, or token ids (list or lists)")
    echo = _bool(body, "echo")
    max_tokens = _int(body, "max_tokens", COMPLETION_MAX_TOKENS, 0)
    if max_tokens == 0 and not echo:
        raise bad("max_tokens", "must be at least 1 (0 only with echo, to score the prompt)")
    logprobs = _int(body, "logprobs", None, 0, MAX_LOGPROBS)
    n, stream, usage = _common(body)
    for p in prompts:
        _check_length(p, max_tokens, context, "prompt")
    s = sampling(body, vocab=vocab, max_tokens=max_tokens, logprobs=logprobs, echo=echo)
    choices = _choices(s, n) * len(prompts)
    return Parsed(_model(body), prompts, choices, n, stream, usage, chat=False)


ROLES = ("system", "developer", "user", "assistant", "tool")


def chat_messages(body: dict) -> list[dict[str, str]]:
    """`messages` as {role, content} dicts with text content (parts of type text joined)."""
    messages = body.get("messages")
    if messages is None:
        raise bad("messages", "is required")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(where, "must be an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise bad(f"{where}.role", f"must be one of {', '.join(ROLES)}, got {role!r}")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise bad(f"{where}.content[{j}]", "only text parts are supported")
                texts.append(str(part.get("text", "")))
            content = "".join(texts)
        elif content is None and role == "assistant":
            content = ""
        elif not isinstance(content, str):
            raise bad(f"{where}.content", "must be a string or a list of text parts")
        out.append({"role": "system" if role == "developer" else role, "content": content})
        out[-1].update(_tool_fields(m, role, where))
    return out


def _tool_fields(m: dict, role: str, where: str) -> dict[str, Any]:
    """An assistant's `tool_calls` (arguments as objects, as templates write them) and a tool
    result's `tool_call_id`/`name`, checked."""
    if role == "assistant" and m.get("tool_calls"):
        try:
            return {"tool_calls": tool_calls(m["tool_calls"], "", f"{where}.tool_calls")}
        except BadRow as e:
            raise bad(f"{where}.tool_calls", str(e).removeprefix(": ")) from None
    if role == "tool":
        kept = {k: m[k] for k in ("tool_call_id", "name") if m.get(k) is not None}
        for k, v in kept.items():
            if not isinstance(v, str):
                raise bad(f"{where}.{k}", "must be a string")
        return kept
    return {}


def chat_text(body: dict, tokenizer: Tokenizer, tools: Any = None) -> str:
    """`messages` rendered by the model's chat template, with the assistant's turn opened
    (`tools`: a `serve.tools.ToolRequest`, whose schemas are rendered)."""
    messages = chat_messages(body)
    if not tokenizer.chat_template:
        raise bad("model", "this model has no chat template; use /v1/completions")
    extra = {"tools": tools.tools} if tools is not None and tools.tools else {}
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, **extra)
    # The template is data: it may refuse a conversation (raise_exception), divide by zero, or
    # `{% include %}` with no loader (a TypeError); none of that is a bug of the server's.
    except Exception as e:
        raise bad("messages", f"the chat template refused them: {e}") from None


def parse_chat(body: dict, tokenizer: Tokenizer, context: int, tools: Any = None) -> Parsed:
    """A chat request; `tools`: its `serve.tools.ToolRequest` (the caller checks `tools`)."""
    _unsupported(body, "audio", "prediction")
    fmt = body.get("response_format")
    if fmt not in (None, {"type": "text"}):
        raise bad("response_format", "only {'type': 'text'} is supported")
    prompt = tokenizer.encode(chat_text(body, tokenizer, tools))
    prompt += tools.prefill_ids if tools is not None else []  # a forced call's start
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    default = max(context - len(prompt), 0)
    max_tokens = _int({"max_tokens": limit}, "max_tokens", default, 1)
    want = _bool(body, "logprobs")
    top = _int(body, "top_logprobs", None, 0, MAX_LOGPROBS)
    if top is not None and not want:
        raise bad("top_logprobs", "needs logprobs: true")
    n, stream, usage = _common(body)
    _check_length(prompt, max_tokens, context, "messages")
    s = sampling(
        body,
        vocab=tokenizer.vocab_size,
        max_tokens=max_tokens,
        logprobs=(top or 0) if want else None,
        echo=False,
    )
    return Parsed(_model(body), [prompt], _choices(s, n), n, stream, usage, True, top, tools)


def _model(body: dict) -> str:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model", f"must be a string, got {model!r}")
    return model or ""


# ---- responses ---------------------------------------------------------------------------


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def token_text(tokenizer: Tokenizer, token: int) -> str:
    return tokenizer.decode([token])


def completion_logprobs(
    tokenizer: Tokenizer, scored: list[TokenLogprob | None], tokens: list[int], offset: int = 0
) -> dict[str, Any]:
    """The completions API's logprobs object for `tokens` (None entries: unscored, as the
    first prompt token is)."""
    out: dict[str, list] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    pos = offset
    for token, lp in zip(tokens, scored, strict=True):
        text = token_text(tokenizer, token)
        out["tokens"].append(text)
        out["text_offset"].append(pos)
        pos += len(text)
        if lp is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(lp.logprob)
        top = {token_text(tokenizer, t): v for t, v in lp.top}
        top.setdefault(text, lp.logprob)  # the chosen token is always listed (OpenAI)
        out["top_logprobs"].append(top)
    return out


def chat_logprobs(tokenizer: Tokenizer, scored: list[TokenLogprob]) -> dict[str, Any]:
    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {
        "content": [
            {**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
            for lp in scored
        ]
    }
