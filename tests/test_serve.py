"""`nanotune serve` end to end: a real server process on loopback, the official `openai`
client, and answers compared with `nanotune generate` on the same model and adapter.

One server (a tiny GQA Llama with the SmolLM2 tokenizer and chat template, two random LoRA
adapters, an API key) serves most tests; the shutdown and queue tests start their own.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

KEY = "test-key"
PROMPTS = ["The quick brown fox", "Once upon a time", "1, 2, 3,", "Paris is"]


def make_adapter(base_dir: Path, out: Path, seed: int, targets="all-linear") -> Path:
    """A LoRA adapter with random (non-zero) B, so it changes the model's answers."""
    from nanotune.methods.lora import apply_lora
    from nanotune.weights import load_model
    from nanotune.weights.peft import save_adapter

    model, tokenizer = load_model(base_dir)
    apply_lora(model, targets, r=4, alpha=8)
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        p.requires_grad_("lora" in name)
        if "lora_B" in name:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    save_adapter(model, out, str(base_dir))
    tokenizer.save(out)
    return out


class Running:
    def __init__(self, proc: subprocess.Popen, url: str) -> None:
        self.proc, self.url = proc, url

    def client(self, key: str = KEY, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=key, max_retries=0, **kw)

    def post(self, path: str, body, key: str | None = KEY, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        root = self.url.removesuffix("/v1")
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return httpx.post(root + path, content=data, headers=headers, timeout=60, **kw)

    def health(self) -> dict:
        return httpx.get(self.url.removesuffix("/v1") + "/health", timeout=10).json()


def start(model: Path, *flags: str) -> Running:
    cmd = [sys.executable, "-m", "nanotune", "serve", "--model", str(model), "--port", "0", *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "http://" not in line:
        proc.kill()
        raise AssertionError(f"server did not start: {line}{proc.stderr.read()}")
    url = line.split()[2]
    for _ in range(100):
        try:
            httpx.get(url.removesuffix("/v1") + "/health", timeout=1)
            return Running(proc, url)
        except httpx.TransportError:
            time.sleep(0.05)
    proc.kill()
    raise AssertionError("server never answered /health")


def stop(server: Running) -> None:
    server.proc.send_signal(signal.SIGTERM)
    try:
        server.proc.wait(30)
    except subprocess.TimeoutExpired:
        server.proc.kill()


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve_adapters")
    return {
        "alpha": make_adapter(tiny_llama_dir, root / "alpha", seed=1),
        "beta": make_adapter(tiny_llama_dir, root / "beta", seed=2, targets=["q_proj", "v_proj"]),
    }


@pytest.fixture(scope="module")
def server(tiny_llama_dir, adapters):
    running = start(
        tiny_llama_dir,
        "--served-model-name",
        "base",
        *(a for name, path in adapters.items() for a in ("--adapter", f"{name}={path}")),
        "--api-key",
        KEY,
        "--max-batch",
        "8",
        "--max-body-kb",
        "64",
    )
    yield running
    stop(running)


@pytest.fixture(scope="module")
def local(tiny_llama_dir, adapters):
    """(model, tokenizer) per served name, loaded in this process as `nanotune generate` does."""
    from nanotune.jobs import artifacts

    out = {"base": artifacts.load(str(tiny_llama_dir))}
    for name, path in adapters.items():
        out[name] = artifacts.load(str(tiny_llama_dir), str(path))
    return out


def expected(local, name: str, prompt: str, n: int, chat: bool = False) -> str:
    from nanotune.generate import GenerationConfig, chat_prompt, generate

    model, tok = local[name]
    text = chat_prompt(tok, [{"role": "user", "content": prompt}]) if chat else prompt
    return generate(model, tok, [text], GenerationConfig(max_new_tokens=n))[0]


# ---- answers ----------------------------------------------------------------------------


def test_models_lists_the_base_and_each_adapter(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["base", "alpha", "beta"]
    assert models.data[1].parent == "base"


def test_models_name_adapters_by_name_not_by_their_folder_on_the_server(server, adapters):
    r = httpx.get(server.url + "/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    cards = r.json()["data"]
    assert [c["root"] for c in cards] == [c["id"] for c in cards] == ["base", "alpha", "beta"]
    assert all(str(folder) not in r.text for folder in adapters.values())


@pytest.mark.parametrize("name", ["base", "alpha", "beta"])
def test_completions_equal_generate_plain_and_streamed(server, local, name):
    client = server.client()
    answers = set()
    for prompt in PROMPTS[:2]:
        want = expected(local, name, prompt, 12)
        got = client.completions.create(model=name, prompt=prompt, max_tokens=12, temperature=0)
        assert got.choices[0].text == want
        assert got.usage.prompt_tokens == len(local[name][1].encode(prompt))
        pieces = client.completions.create(
            model=name, prompt=prompt, max_tokens=12, temperature=0, stream=True
        )
        assert "".join(c.choices[0].text for c in pieces) == want
        answers.add(want)
    assert len(answers) == 2


def test_adapters_change_the_answers(local):
    outs = {name: expected(local, name, PROMPTS[0], 12) for name in ("base", "alpha", "beta")}
    assert len(set(outs.values())) == 3, outs


@pytest.mark.parametrize("name", ["base", "alpha"])
def test_chat_equals_generate_plain_and_streamed(server, local, name):
    client = server.client()
    want = expected(local, name, "Hello there", 10, chat=True)
    messages = [{"role": "user", "content": "Hello there"}]
    got = client.chat.completions.create(
        model=name, messages=messages, max_tokens=10, temperature=0
    )
    assert got.choices[0].message.content == want
    assert got.choices[0].message.role == "assistant"
    chunks = list(
        client.chat.completions.create(
            model=name,
            messages=messages,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == got.usage.completion_tokens


def test_batching_across_adapters_equals_one_at_a_time(server):
    """8 concurrent greedy requests over base + 2 adapters give the tokens of the same 8
    requests sent one by one; the server did run them in one batch."""
    client = server.client()
    jobs = [(["base", "alpha", "beta"][i % 3], PROMPTS[i % 4], 6 + 3 * i) for i in range(8)]

    def ask(job):
        name, prompt, n = job
        r = client.completions.create(
            model=name, prompt=prompt, max_tokens=n, temperature=0, logprobs=0
        )
        return r.choices[0].logprobs.tokens

    alone = [ask(job) for job in jobs]
    before = server.health()["peak_running"]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, jobs))
    assert together == alone
    assert server.health()["peak_running"] >= max(before, 4)


def test_prompts_sharing_a_prefix_reuse_its_keys_and_answer_as_generate(server, local):
    """A prompt that starts as an earlier one of the same adapter did prefills only the rest (the
    prefix cache); a short rest joins the decode batch a row per token, a long prompt gets a
    forward of its own. Every answer stays `nanotune generate`'s, alone and in a batch."""
    client = server.client()
    context = "Once upon a time there was a fox who lived by the river. " * 4  # > 32 tokens
    jobs = [(name, context + tail) for name in ("base", "alpha") for tail in ("It ran", "It hid")]
    before = server.health()

    def ask(job):
        name, prompt = job
        r = client.completions.create(model=name, prompt=prompt, max_tokens=8, temperature=0)
        return r.choices[0].text

    assert [ask(job) for job in jobs] == [expected(local, n, p, 8) for n, p in jobs]
    hits = server.health()
    assert hits["prefix_hits"] - before["prefix_hits"] >= 2  # "It hid" after "It ran", twice
    _, tok = local["base"]
    shared = len(tok.encode(context)) - 1
    assert hits["prefix_tokens_reused"] - before["prefix_tokens_reused"] >= 2 * shared
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert list(pool.map(ask, jobs * 2)) == [ask(job) for job in jobs] * 2


def test_stop_seed_n_and_sampling(server):
    client = server.client()
    full = client.completions.create(model="alpha", prompt="Once", max_tokens=12, temperature=0)
    text = full.choices[0].text
    cut = text[3:6]
    stopped = client.completions.create(
        model="alpha", prompt="Once", max_tokens=12, temperature=0, stop=[cut]
    )
    assert stopped.choices[0].text == text[: text.index(cut)]
    assert stopped.choices[0].finish_reason == "stop"
    assert full.choices[0].finish_reason == "length"
    kw = dict(model="beta", prompt="Once", max_tokens=8, temperature=1.0, top_p=0.9, seed=7, n=3)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert len({c.text for c in a.choices}) > 1  # each choice samples on its own


def test_several_prompts_with_n_choices_each_through_the_openai_client(server, local):
    """Two prompts (texts, then token ids), n=2: choice j of prompt p is choices[p * n + j], as
    OpenAI and vLLM order them; greedy, each is `nanotune generate`'s answer to its prompt, and
    seeded, each prompt samples as it does alone."""
    client = server.client()
    _, tok = local["alpha"]
    want = [expected(local, "alpha", p, 6) for p in PROMPTS[:2]]
    assert want[0] != want[1]
    for prompt in (PROMPTS[:2], [tok.encode(p) for p in PROMPTS[:2]]):
        r = client.completions.create(
            model="alpha", prompt=prompt, n=2, max_tokens=6, temperature=0
        )
        assert [c.index for c in r.choices] == [0, 1, 2, 3]
        assert [c.text for c in r.choices] == [want[0], want[0], want[1], want[1]]
        assert r.usage.prompt_tokens == sum(len(tok.encode(p)) for p in PROMPTS[:2])
    kw = dict(model="alpha", n=2, max_tokens=6, temperature=1.0, seed=5)
    both = client.completions.create(prompt=PROMPTS[:2], **kw)
    alone = [client.completions.create(prompt=p, **kw) for p in PROMPTS[:2]]
    assert [c.text for c in both.choices] == [c.text for a in alone for c in a.choices]


def test_any_int64_seed_samples(server):
    """vLLM's range; with n, choice j's seed + j still fits torch's generator (< 2**64)."""
    client = server.client()
    for seed in (-(2**63), -1, 2**63 - 1):
        r = client.completions.create(model="base", prompt="Once", max_tokens=2, n=2, seed=seed)
        assert len(r.choices) == 2


def test_echo_logprobs_score_the_prompt_as_lm_eval_reads_them(server, local):
    """lm-evaluation-harness's loglikelihood request: the prompt as token ids, echo, logprobs=1,
    max_tokens=1; it sums token_logprobs over the continuation and checks greediness against
    top_logprobs."""
    model, tok = local["alpha"]
    ids = tok.encode("The capital of France is Paris")
    r = server.client().completions.create(
        model="alpha", prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=1, seed=1
    )
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None
    with torch.no_grad():
        want = model(torch.tensor([ids])).log_softmax(-1)[0]
    for i in range(1, len(ids)):
        assert abs(lp.token_logprobs[i] - float(want[i - 1, ids[i]])) < 1e-4
        assert len(lp.top_logprobs[i]) >= 1
    greedy = want[-1].argmax()
    assert abs(lp.token_logprobs[-1] - float(want[-1, greedy])) < 1e-4


def test_a_generated_stop_token_is_in_the_logprobs_plain_and_streamed(server, local):
    """As vLLM reports it: the token a choice stopped on closes `logprobs` (completions and
    chat, plain and streamed) and counts in usage; its text is not in the answer."""
    model, tok = local["base"]
    prompt = tok.encode("Once upon a time")
    greedy = expected_ids(model, tok, prompt, 3)
    stop = greedy[2]
    with torch.no_grad():
        want = model(torch.tensor([prompt + greedy[:2]]))[0, -1].log_softmax(-1)[stop]
    client = server.client()
    common = dict(model="base", max_tokens=8, temperature=0, extra_body={"stop_token_ids": [stop]})
    r = client.completions.create(prompt=prompt, logprobs=1, **common)
    lp = r.choices[0].logprobs
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 3
    assert len(lp.token_logprobs) == 3 and abs(lp.token_logprobs[-1] - float(want)) < 1e-4
    assert r.choices[0].text == tok.decode(greedy[:2])
    chunks = list(client.completions.create(prompt=prompt, logprobs=1, stream=True, **common))
    streamed = [
        x for c in chunks if c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs
    ]
    assert streamed == pytest.approx(lp.token_logprobs, abs=1e-6)
    assert chunks[-1].choices[0].finish_reason == "stop"
    # Chat: the same three entries, the last one the stop token's.
    messages = [{"role": "user", "content": "Hello"}]
    chat_ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
    cgreedy = expected_ids(model, tok, chat_ids, 3)
    common["extra_body"] = {"stop_token_ids": [cgreedy[2]]}
    c = client.chat.completions.create(messages=messages, logprobs=True, **common)
    assert len(c.choices[0].logprobs.content) == 3 and c.choices[0].finish_reason == "stop"
    chunks = list(
        client.chat.completions.create(messages=messages, logprobs=True, stream=True, **common)
    )
    entries = [
        e
        for x in chunks
        if x.choices and x.choices[0].logprobs
        for e in x.choices[0].logprobs.content
    ]
    assert [e.logprob for e in entries] == pytest.approx(
        [e.logprob for e in c.choices[0].logprobs.content]
    )


def expected_ids(model, tok, prompt: list[int], n: int) -> list[int]:
    from nanotune.generate import GenerationConfig, generate_ids

    return generate_ids(
        model, [prompt], GenerationConfig(max_new_tokens=n, stop_token_ids=()), tok
    )[0]


def test_a_stream_keeps_going_while_a_request_that_would_overflow_is_refused(server, local):
    """The probe's reproduction: a long greedy stream, and during it a request with temperature
    1e-40 (logits / T overflow): that one is refused, the stream runs to its end unchanged."""
    model, tok = local["base"]
    prompt = tok.encode("hi")
    want = expected_ids(model, tok, prompt, 100)
    client = server.client()
    stream = client.completions.create(
        model="base",
        prompt=prompt,
        max_tokens=100,
        temperature=0,
        stream=True,
        extra_body={"stop_token_ids": []},
    )
    pieces, bad = [], None
    for chunk in stream:
        pieces.append(chunk.choices[0].text)
        if len(pieces) == 5:
            bad = server.post(
                "/v1/completions", {"prompt": "hi", "temperature": 1e-40, "max_tokens": 3}
            )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "temperature"
    assert "".join(pieces) == tok.decode(want)


def test_adapters_load_and_unload_at_run_time(server, local, adapters):
    r = server.post(
        "/v1/load_lora_adapter", {"lora_name": "gamma", "lora_path": str(adapters["alpha"])}
    )
    assert r.status_code == 200, r.text
    client = server.client()
    got = client.completions.create(model="gamma", prompt=PROMPTS[0], max_tokens=8, temperature=0)
    assert got.choices[0].text == expected(local, "alpha", PROMPTS[0], 8)
    assert server.post("/v1/unload_lora_adapter", {"lora_name": "gamma"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gamma", prompt="x", max_tokens=2)


def test_a_run_time_load_reads_paths_as_every_entrance_does(
    server, adapters, tiny_llama_dir, tmp_path
):
    """The one resolver: a run directory loads its final/; a model folder is a 400 naming
    lora_path and what it is, and the server goes on."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(adapters["alpha"], run / "final")
    r = server.post("/v1/load_lora_adapter", {"lora_name": "from-run", "lora_path": str(run)})
    assert r.status_code == 200, r.text
    server.post("/v1/unload_lora_adapter", {"lora_name": "from-run"})
    r = server.post("/v1/load_lora_adapter", {"lora_name": "m", "lora_path": str(tiny_llama_dir)})
    assert r.status_code == 400 and "lora_path" in r.json()["error"]["message"], r.text
    assert "not an adapter folder" in r.json()["error"]["message"]
    got = server.client().completions.create(model="base", prompt="x", max_tokens=2)
    assert got.usage.completion_tokens >= 1


def test_a_chat_template_that_fails_to_render_is_a_400_naming_messages(server, adapters, tmp_path):
    """`{% include %}` in an adapter's template: the sandbox has no loader (a TypeError, not a
    template error); /tokenize and chat both refuse the messages, and the server goes on."""
    folder = tmp_path / "included"
    shutil.copytree(adapters["alpha"], folder)
    (folder / "chat_template.jinja").write_text("{% include 'other.jinja' %}")
    r = server.post("/v1/load_lora_adapter", {"lora_name": "included", "lora_path": str(folder)})
    assert r.status_code == 200, r.text
    try:
        body = {"model": "included", "messages": [{"role": "user", "content": "hi"}]}
        for path in ("/tokenize", "/v1/chat/completions"):
            r = server.post(path, body)
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == "messages"
        assert server.post("/tokenize", {"model": "included", "prompt": "hi"}).status_code == 200
    finally:
        server.post("/v1/unload_lora_adapter", {"lora_name": "included"})


# ---- bad requests -----------------------------------------------------------------------

BAD = [
    # (what, path, body, key, status, param)
    ("malformed json", "/v1/completions", b'{"model": "base", "prompt": ', KEY, 400, None),
    ("not an object", "/v1/completions", b"[1, 2]", KEY, 400, None),
    ("missing messages", "/v1/chat/completions", {"model": "base"}, KEY, 400, "messages"),
    ("missing prompt", "/v1/completions", {"model": "base"}, KEY, 400, "prompt"),
    ("unknown model", "/v1/completions", {"model": "nope", "prompt": "hi"}, KEY, 404, "model"),
    (
        "negative max_tokens",
        "/v1/completions",
        {"prompt": "hi", "max_tokens": -1},
        KEY,
        400,
        "max_tokens",
    ),
    (
        "temperature < 0",
        "/v1/completions",
        {"prompt": "hi", "temperature": -0.5},
        KEY,
        400,
        "temperature",
    ),
    (
        "top_p > 1",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "top_p": 1.5},
        KEY,
        400,
        "top_p",
    ),
    (
        "over-long prompt",
        "/v1/completions",
        {"prompt": "word " * 200, "max_tokens": 4},
        KEY,
        400,
        "prompt",
    ),
    (
        "prompt + max_tokens over context",
        "/v1/completions",
        {"prompt": "hi", "max_tokens": 500},
        KEY,
        400,
        "max_tokens",
    ),
    (
        "bad role",
        "/v1/chat/completions",
        {"messages": [{"role": "robot", "content": "x"}]},
        KEY,
        400,
        "messages[0].role",
    ),
    ("token id out of range", "/v1/completions", {"prompt": [1, 10**9]}, KEY, 400, "prompt"),
    ("n too large", "/v1/completions", {"prompt": "hi", "n": 1000}, KEY, 400, "n"),
    (
        "tools",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
        KEY,
        400,
        "tools",
    ),
    ("wrong api key", "/v1/completions", {"prompt": "hi"}, "wrong", 401, None),
    ("no api key", "/v1/completions", {"prompt": "hi"}, None, 401, None),
    ("oversized body", "/v1/completions", {"prompt": "x" * 100_000}, KEY, 413, None),
    ("unknown route", "/v1/nothing", {}, KEY, 404, None),
    ("body not UTF-8", "/v1/completions", '{"prompt": "hi"}'.encode("utf-16"), KEY, 400, None),
    (
        "json nested 30,000 deep",
        "/v1/completions",
        b'{"prompt": ' + b"[" * 30_000 + b"]" * 30_000 + b"}",
        KEY,
        400,
        None,
    ),
    (
        "lone surrogate in a prompt",
        "/v1/completions",
        b'{"prompt": ["ok", "a\\ud800"]}',
        KEY,
        400,
        "prompt[1]",
    ),
    (
        "lone surrogate in a message",
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "\\udfff"}]}',
        KEY,
        400,
        "messages[0].content",
    ),
    ("seed past int64", "/v1/completions", {"prompt": "hi", "seed": 2**64}, KEY, 400, "seed"),
    (
        "logit_bias out of range",
        "/v1/completions",
        {"prompt": "hi", "logit_bias": {"1": 500}},
        KEY,
        400,
        "logit_bias",
    ),
    (
        "logit_bias -Infinity",
        "/v1/completions",
        b'{"prompt": "hi", "logit_bias": {"1": -Infinity}}',
        KEY,
        400,
        "logit_bias",
    ),
    (
        "temperature NaN",
        "/v1/completions",
        b'{"prompt": "hi", "temperature": NaN}',
        KEY,
        400,
        "temperature",
    ),
    (
        "top_p Infinity",
        "/v1/completions",
        b'{"prompt": "hi", "top_p": Infinity}',
        KEY,
        400,
        "top_p",
    ),
    (
        "an int past float's range",
        "/v1/completions",
        {"prompt": "hi", "presence_penalty": 10**400},
        KEY,
        400,
        "presence_penalty",
    ),
    (
        "temperature 1e-40",
        "/v1/completions",
        {"prompt": "hi", "temperature": 1e-40},
        KEY,
        400,
        "temperature",
    ),
    (
        "temperature 1e-300",
        "/v1/completions",
        {"prompt": "hi", "temperature": 1e-300},
        KEY,
        400,
        "temperature",
    ),
    (
        "repetition_penalty 1e-300",
        "/v1/completions",
        {"prompt": "hi", "repetition_penalty": 1e-300},
        KEY,
        400,
        "repetition_penalty",
    ),
]


@pytest.mark.parametrize("what,path,body,key,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_an_openai_error_and_the_server_goes_on(
    server, what, path, body, key, status, param
):
    r = server.post(path, body, key=key)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param and param.split("[")[0] in error["message"]
    good = server.client().completions.create(model="base", prompt="hi", max_tokens=2)
    assert good.choices[0].finish_reason in ("length", "stop")


def test_client_disconnect_mid_stream_frees_its_slot(server):
    """A client that goes away mid-stream: its sequence stops at the next token (the server's
    running count drops back) and the next request is served."""
    body = {
        "model": "alpha",
        "prompt": "Once",
        "max_tokens": 100,
        "stream": True,
        "temperature": 0,
        "stop_token_ids": [],
    }
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream(
        "POST", server.url + "/completions", json=body, headers=headers, timeout=30
    ) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    for _ in range(200):
        if server.health()["running"] == 0:
            break
        time.sleep(0.05)
    assert server.health()["running"] == 0
    good = server.client().completions.create(model="alpha", prompt="hi", max_tokens=2)
    assert good.usage.completion_tokens <= 2


def test_the_openai_client_sees_typed_errors(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="base", prompt="hi", max_tokens=2, temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.AuthenticationError):
        server.client(key="bad").models.list()


# ---- limits and shutdown ----------------------------------------------------------------


def test_a_full_queue_answers_429_and_recovers(tiny_llama_dir):
    running = start(tiny_llama_dir, "--max-batch", "1", "--max-queue", "1")
    try:
        body = {"prompt": "Once", "max_tokens": 100, "stop_token_ids": [], "temperature": 0}
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            codes = list(
                pool.map(lambda _: running.post("/v1/completions", body).status_code, range(6))
            )
        assert 429 in codes and 200 in codes
        r = running.post("/v1/completions", {"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200
    finally:
        stop(running)


def test_a_request_of_more_sequences_than_the_queue_takes_answers_429(tiny_llama_dir):
    """20,000 prompts can never be queued: 429 naming max_queue, not a 500 from building them."""
    running = start(tiny_llama_dir, "--max-queue", "8")
    try:
        r = running.post("/v1/completions", {"prompt": ["Once"] * 20_000, "max_tokens": 2})
        assert r.status_code == 429, r.text
        assert "max_queue=8" in r.json()["error"]["message"]
        r = running.post("/v1/completions", {"prompt": ["Once", "hi"] * 2, "n": 2, "max_tokens": 2})
        assert r.status_code == 200 and len(r.json()["choices"]) == 8
    finally:
        stop(running)


def test_sigterm_finishes_in_flight_requests(tiny_llama_dir):
    running = start(tiny_llama_dir)
    got = {}

    def ask():
        got["r"] = running.post(
            "/v1/completions",
            {"prompt": "Once", "max_tokens": 60, "stop_token_ids": [], "temperature": 0},
        )

    t = threading.Thread(target=ask)
    t.start()
    for _ in range(200):
        if running.health()["running"]:
            break
        time.sleep(0.01)
    running.proc.send_signal(signal.SIGTERM)
    t.join(60)
    assert running.proc.wait(30) == 0
    assert got["r"].status_code == 200
    assert got["r"].json()["usage"]["completion_tokens"] == 60


def test_cli_refuses_bad_setups(tiny_llama_dir, tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "nanotune", "serve", *args],
            capture_output=True,
            text=True,
            timeout=120,
        )

    r = run("--model", str(tiny_llama_dir), "--adapter", f"x={tmp_path}")
    assert r.returncode == 2 and "not an adapter folder" in r.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = run("--model", str(tiny_llama_dir), "--port", str(s.getsockname()[1]))
    assert r.returncode == 2 and "cannot listen" in r.stderr
    assert os.path.isdir(tmp_path)  # nothing touched


def test_the_api_key_can_stay_out_of_the_process_list(monkeypatch, capsys):
    """--api-key shows in `ps`; its help says so and NANOTUNE_API_KEY is read instead."""
    from nanotune.cli import build_parser

    monkeypatch.setenv("NANOTUNE_API_KEY", "from-the-environment")
    assert build_parser().parse_args(["serve"]).api_key == "from-the-environment"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "process list" in help_text and "NANOTUNE_API_KEY to keep it out" in help_text


def test_adapters_that_cannot_share_the_base_are_refused_with_merge_advice(
    tiny_llama_dir, tmp_path
):
    """DoRA rescales the base output, a trained embedding changes the shared vocabulary: both
    are refused at load, naming the folder and the way out (merge), and nothing changes."""
    from nanotune.decoding.engine import Engine
    from nanotune.errors import NanotuneError
    from nanotune.methods.lora import apply_lora
    from nanotune.weights import load_model
    from nanotune.weights.peft import save_adapter

    dora, _ = load_model(tiny_llama_dir)
    apply_lora(dora, "all-linear", r=4, alpha=8, dora=True)
    for name, p in dora.named_parameters():
        p.requires_grad_("lora" in name)
    save_adapter(dora, tmp_path / "dora", str(tiny_llama_dir))
    emb, _ = load_model(tiny_llama_dir)
    apply_lora(emb, "all-linear", r=4, alpha=8)
    for name, p in emb.named_parameters():
        p.requires_grad_("lora" in name or name == "wte.weight")
    save_adapter(emb, tmp_path / "emb", str(tiny_llama_dir))

    model, tok = load_model(tiny_llama_dir)
    engine = Engine(model, tok)
    for folder, why in (("dora", "DoRA"), ("emb", "trains the embedding")):
        with pytest.raises(NanotuneError, match=f"{why}.*nanotune merge"):
            engine.load_adapter(folder, tmp_path / folder)
    assert engine.adapters == {} and all(not layer.pairs for layer in engine.layers.values())


def test_an_adapter_loaded_onto_an_int8_engine_is_refused_with_merge_advice(
    tiny_llama_dir, adapters
):
    """int8 replaces the base's linears that adapters attach to: every way in (start-up's
    --adapter and run-time loading alike) ends in Engine.load_adapter, which refuses it."""
    from nanotune.decoding.engine import Engine
    from nanotune.errors import NanotuneError
    from nanotune.models.decoding import for_decoding
    from nanotune.weights import load_model

    model, tok = load_model(tiny_llama_dir)
    engine = Engine(for_decoding(model, "int8"), tok)
    with pytest.raises(NanotuneError, match="--dtype int8.*nanotune merge"):
        engine.load_adapter("alpha", adapters["alpha"])
    assert engine.adapters == {}


def test_a_run_time_adapter_load_on_an_int8_server_is_a_400_and_it_goes_on(
    tiny_llama_dir, adapters
):
    running = start(tiny_llama_dir, "--dtype", "int8", "--api-key", KEY)
    try:
        body = {"lora_name": "gamma", "lora_path": str(adapters["alpha"])}
        r = running.post("/v1/load_lora_adapter", body)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert "--dtype int8" in error["message"] and "nanotune merge" in error["message"]
        client = running.client()
        (base,) = (m.id for m in client.models.list().data)  # no adapter came in
        got = client.completions.create(
            model=base,
            prompt="Once",
            max_tokens=4,
            temperature=0,
            extra_body={"stop_token_ids": []},
        )
        assert got.usage.completion_tokens == 4
    finally:
        stop(running)


def test_bfloat16_serving_answers(tiny_llama_dir, adapters):
    """--dtype bfloat16: weights and adapters in bf16 (the base prepacked, the KV cache float32
    on CPU); requests are answered in full."""
    running = start(
        tiny_llama_dir, "--dtype", "bfloat16", "--adapter", f"alpha={adapters['alpha']}"
    )
    try:
        client = running.client()
        for model in (client.models.list().data[0].id, "alpha"):
            r = client.completions.create(
                model=model,
                prompt="Once",
                max_tokens=6,
                temperature=0,
                extra_body={"stop_token_ids": []},
            )
            assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length"
    finally:
        stop(running)


@pytest.mark.slow
def test_compiled_serving_answers_as_generate(tiny_llama_dir, local):
    """--compile: two concurrent requests decode through the compiled steps the tokens
    `nanotune generate` gives each."""
    import concurrent.futures

    running = start(tiny_llama_dir, "--compile", "--max-batch", "2", "--api-key", KEY)
    try:
        client = running.client()
        prompts = ["Once upon a time", "The quick brown fox"]

        def ask(prompt: str) -> str:
            r = client.completions.create(
                model=str(tiny_llama_dir), prompt=prompt, max_tokens=12, temperature=0
            )
            return r.choices[0].text

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(ask, prompts))
        assert answers == [expected(local, "base", p, 12) for p in prompts]
    finally:
        stop(running)


def test_the_prefix_cache_keeps_the_longest_match_within_its_bound(tiny_llama_dir):
    from nanotune.decoding.engine import _PrefixCache, _SlotCache
    from nanotune.weights import load_model

    model, _ = load_model(tiny_llama_dir)
    slots = _SlotCache(model, 2)
    slots.reserve(64, 2)
    per_token = sum(t[0, :, :1].numel() * t.element_size() for t in (*slots.k, *slots.v))
    cache = _PrefixCache(max_bytes=25 * per_token)
    cache.add(1, list(range(10)), slots, 0)
    cache.add(1, [0, 1, 2, 7, 7, 7], slots, 1)
    assert cache.match(1, [0, 1, 2, 3, 4, 9])[0] == 5  # the first prompt shares 5 tokens
    assert cache.match(1, list(range(10)))[0] == 9  # the last token is always recomputed
    assert cache.match(2, list(range(10))) == (0, None)  # another adapter's keys differ
    # 28 tokens would be held, over 25: the least recently used prompt (the second) goes.
    cache.add(1, list(range(100, 112)), slots, 0)
    assert cache.bytes == 22 * per_token
    assert cache.match(1, [0, 1, 2, 7, 7])[0] == 3 and cache.match(1, [0, 1, 2, 3, 4])[0] == 4
    cache.drop(1)
    assert cache.bytes == 0 and cache.match(1, [0, 1, 2, 3])[0] == 0
