"""`nanotune serve` end to end: a real server process on loopback, the official `openai`
client, and answers compared with `nanotune generate` on the same model and adapter.

One server (a tiny GQA Llama with the SmolLM2 tokenizer and chat template, two random LoRA
adapters, an API key) serves most tests; the shutdown and queue tests start their own.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
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
        "--served-model-name", "base",
        *(a for name, path in adapters.items() for a in ("--adapter", f"{name}={path}")),
        "--api-key", KEY,
        "--max-batch", "8",
        "--max-body-kb", "64",
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
    got = client.chat.completions.create(model=name, messages=messages, max_tokens=10, temperature=0)
    assert got.choices[0].message.content == want
    assert got.choices[0].message.role == "assistant"
    chunks = list(
        client.chat.completions.create(
            model=name, messages=messages, max_tokens=10, temperature=0, stream=True,
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
        r = client.completions.create(model=name, prompt=prompt, max_tokens=n, temperature=0,
                                      logprobs=0)
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


def test_adapters_load_and_unload_at_run_time(server, local, adapters):
    r = server.post("/v1/load_lora_adapter", {"lora_name": "gamma", "lora_path": str(adapters["alpha"])})
    assert r.status_code == 200, r.text
    client = server.client()
    got = client.completions.create(model="gamma", prompt=PROMPTS[0], max_tokens=8, temperature=0)
    assert got.choices[0].text == expected(local, "alpha", PROMPTS[0], 8)
    assert server.post("/v1/unload_lora_adapter", {"lora_name": "gamma"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gamma", prompt="x", max_tokens=2)


# ---- bad requests -----------------------------------------------------------------------

BAD = [
    # (what, path, body, key, status, param)
    ("malformed json", "/v1/completions", b'{"model": "base", "prompt": ', KEY, 400, None),
    ("not an object", "/v1/completions", b"[1, 2]", KEY, 400, None),
    ("missing messages", "/v1/chat/completions", {"model": "base"}, KEY, 400, "messages"),
    ("missing prompt", "/v1/completions", {"model": "base"}, KEY, 400, "prompt"),
    ("unknown model", "/v1/completions", {"model": "nope", "prompt": "hi"}, KEY, 404, "model"),
    ("negative max_tokens", "/v1/completions", {"prompt": "hi", "max_tokens": -1}, KEY, 400, "max_tokens"),
    ("temperature < 0", "/v1/completions", {"prompt": "hi", "temperature": -0.5}, KEY, 400, "temperature"),
    ("top_p > 1", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}, KEY, 400, "top_p"),
    ("over-long prompt", "/v1/completions", {"prompt": "word " * 200, "max_tokens": 4}, KEY, 400, "prompt"),
    ("prompt + max_tokens over context", "/v1/completions", {"prompt": "hi", "max_tokens": 500}, KEY, 400, "max_tokens"),
    ("bad role", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, KEY, 400, "messages[0].role"),
    ("token id out of range", "/v1/completions", {"prompt": [1, 10**9]}, KEY, 400, "prompt"),
    ("n too large", "/v1/completions", {"prompt": "hi", "n": 1000}, KEY, 400, "n"),
    ("tools", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, KEY, 400, "tools"),
    ("wrong api key", "/v1/completions", {"prompt": "hi"}, "wrong", 401, None),
    ("no api key", "/v1/completions", {"prompt": "hi"}, None, 401, None),
    ("oversized body", "/v1/completions", {"prompt": "x" * 100_000}, KEY, 413, None),
    ("unknown route", "/v1/nothing", {}, KEY, 404, None),
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
    body = {"model": "alpha", "prompt": "Once", "max_tokens": 100, "stream": True, "temperature": 0,
            "stop_token_ids": []}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", server.url + "/completions", json=body, headers=headers, timeout=30) as r:
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
            codes = list(pool.map(lambda _: running.post("/v1/completions", body).status_code, range(6)))
        assert 429 in codes and 200 in codes
        r = running.post("/v1/completions", {"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200
    finally:
        stop(running)


def test_sigterm_finishes_in_flight_requests(tiny_llama_dir):
    running = start(tiny_llama_dir)
    got = {}

    def ask():
        got["r"] = running.post("/v1/completions", {"prompt": "Once", "max_tokens": 60,
                                                   "stop_token_ids": [], "temperature": 0})

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
        return subprocess.run([sys.executable, "-m", "nanotune", "serve", *args],
                              capture_output=True, text=True, timeout=120)

    r = run("--model", str(tiny_llama_dir), "--adapter", f"x={tmp_path}")
    assert r.returncode == 2 and "not an adapter folder" in r.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = run("--model", str(tiny_llama_dir), "--port", str(s.getsockname()[1]))
    assert r.returncode == 2 and "cannot listen" in r.stderr
    assert os.path.isdir(tmp_path)  # nothing touched


def test_adapters_that_cannot_share_the_base_are_refused_with_merge_advice(tiny_llama_dir, tmp_path):
    """DoRA rescales the base output, a trained embedding changes the shared vocabulary: both
    are refused at load, naming the folder and the way out (merge), and nothing changes."""
    from nanotune.errors import NanotuneError
    from nanotune.methods.lora import apply_lora
    from nanotune.serve.engine import Engine
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


def test_bfloat16_serving_answers(tiny_llama_dir, adapters):
    """--dtype bfloat16: weights and adapters in bf16 (the base prepacked, the KV cache float32
    on CPU); requests are answered in full."""
    running = start(tiny_llama_dir, "--dtype", "bfloat16", "--adapter", f"alpha={adapters['alpha']}")
    try:
        client = running.client()
        for model in (client.models.list().data[0].id, "alpha"):
            r = client.completions.create(model=model, prompt="Once", max_tokens=6,
                                          temperature=0, extra_body={"stop_token_ids": []})
            assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length"
    finally:
        stop(running)


def test_the_prefix_cache_keeps_the_longest_match_within_its_bound(tiny_llama_dir):
    from nanotune.serve.engine import _PrefixCache, _SlotCache
    from nanotune.weights import load_model

    model, _ = load_model(tiny_llama_dir)
    slots = _SlotCache(model, 2)
    slots.reserve(64)
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
