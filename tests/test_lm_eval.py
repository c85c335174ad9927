"""lm-evaluation-harness scores multiple-choice answers through `nanotune serve` as nanotune does.

The client's view, not the server's: lm-eval's own `local-completions` model class (remote
tokenizer, `echo` + `logprobs` + `max_tokens: 1`, reading `token_logprobs[ctxlen:-1]`) against
a server started here, on a tiny model trained to end its answers with EOS, the case where a
server that leaves the generated stop token out of `logprobs` makes every answer score 0.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("starlette")
from test_serve import start, stop  # noqa: E402  (the server fixture helpers)

from nanotune.jobs import artifacts  # noqa: E402

# A tiny multiple-choice task: which color goes with which thing (the answer is the index).
FACTS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "blood": "red"}
COLORS = sorted(set(FACTS.values()))


def context(thing: str) -> str:
    return f"Q: what color is {thing}?\nA:"


@pytest.fixture(scope="module")
def trained(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama fully fine-tuned on the facts: answers ' color' then EOS."""
    from nanotune.config import RunConfig
    from nanotune.jobs.finetune import train

    root = tmp_path_factory.mktemp("lm_eval")
    rows = [{"prompt": context(t), "completion": f" {c}"} for t, c in FACTS.items()]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 8))
    cfg = {
        "model": {"name": str(tiny_llama_dir)},
        "method": {"name": "full"},
        "data": {"source": str(root / "train.jsonl"), "max_length": 32},
        "train": {"lr": 3e-3, "max_steps": 60, "micro_batch_size": 8, "device": "cpu"},
        "output_dir": str(root / "run"),
    }
    return train(RunConfig.from_dict(cfg), progress=False).final_dir


def own_loglikelihood(model, tok, ctx: str, cont: str) -> float:
    """log p(cont | ctx) as lm-eval splits the pair: context tokens, then the rest of the whole."""
    whole = tok.encode(ctx + cont)
    n = len(tok.encode(ctx))
    with torch.no_grad():
        logprobs = model(torch.tensor([whole]))[0].float().log_softmax(-1)
    return sum(float(logprobs[i - 1, whole[i]]) for i in range(n, len(whole)))


def test_lm_eval_local_completions_scores_choices_as_nanotune(trained):
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    model, tok = artifacts.load(str(trained))
    server = start(trained, "--served-model-name", "tuned")
    try:
        # The case under test happens: after a right answer the model's next token is EOS.
        ends = [
            server.post(
                "/v1/completions",
                {"prompt": context(t) + f" {c}", "max_tokens": 1, "temperature": 0},
                key=None,
            ).json()["choices"][0]["finish_reason"]
            for t, c in FACTS.items()
        ]
        assert ends.count("stop") >= 3, ends
        lm = LocalCompletionsAPI(
            base_url=server.url + "/completions",
            model="tuned",
            tokenizer_backend="remote",
            tokenized_requests=True,
            num_concurrent=1,
            max_retries=1,
        )
        pairs = [(context(t), f" {c}") for t in FACTS for c in COLORS]
        requests = [
            Instance("loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)
        ]
        scores = [lp for lp, _ in lm.loglikelihood(requests)]
    finally:
        stop(server)
    for (ctx, cont), got in zip(pairs, scores, strict=True):
        assert got < 0  # a choice's tokens were scored, not sliced away
        assert got == pytest.approx(own_loglikelihood(model, tok, ctx, cont), abs=1e-4)
    # And the task is answered: each thing's own color scores best.
    for i, thing in enumerate(FACTS):
        row = scores[i * len(COLORS) : (i + 1) * len(COLORS)]
        assert COLORS[row.index(max(row))] == FACTS[thing]
