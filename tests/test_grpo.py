"""GRPO: the loss against TRL's GRPOTrainer computation, advantages, rewards, generation through
the decoding engine during training, and whole runs (resume after SIGKILL)."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from nanotune.errors import NanotuneError
from nanotune.training.grpo import (
    GRPOObjective,
    Prompt,
    Reward,
    completion_logps,
    group_advantages,
    score,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- parity with TRL's GRPOTrainer loss -------------------------------------------------------


def trl_grpo_loss(policy, inputs: dict, *, loss_type: str, beta: float, eps, eps_high, temp, L):
    """TRL GRPOTrainer's own `_compute_loss` and `_get_per_token_logps_and_entropies` (its fused
    LM head at `temp`, its clipping, KL and reduction) on an HF model, with only the trainer's
    plumbing stood in for. The model is in eval mode: one micro-batch, no accumulation."""
    import contextlib

    from trl.trainer.grpo_trainer import GRPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(policy, temperature=temp, outputs=("log_probs", "entropy"))
    same = SimpleNamespace(
        device="cpu",
        num_processes=1,
        autocast=contextlib.nullcontext,
        gather=lambda x: x,
        gather_for_metrics=lambda x: x,
        reduce=lambda x, reduction="sum": x,
        sync_gradients=True,
        is_main_process=True,
    )
    trainer = SimpleNamespace(
        model=policy,
        accelerator=same,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        loss_type=loss_type,
        beta=beta,
        epsilon_low=eps,
        epsilon_high=eps_high,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        current_gradient_accumulation_steps=1,
        max_completion_length=L,
        aux_loss_enabled=False,
        _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )
    trainer._get_per_token_logps_and_entropies = (
        GRPOTrainer._get_per_token_logps_and_entropies.__get__(trainer)
    )
    value = GRPOTrainer._compute_loss(trainer, policy, inputs)
    return value, trainer._metrics["eval"]


@pytest.fixture(scope="module")
def hf_and_ours(request):
    from transformers import AutoModelForCausalLM

    from nanotune.weights import load_model

    def make(fixture: str):
        folder = request.getfixturevalue(fixture)
        hf = AutoModelForCausalLM.from_pretrained(folder).eval()
        ours = load_model(folder)[0].eval()
        return hf, ours

    return make


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
@pytest.mark.parametrize("fixture", ["tiny_gpt2_dir", "tiny_llama_dir"])
def test_grpo_loss_and_gradients_equal_trls_grpo_trainer(fixture, loss_type, hf_and_ours):
    """A fixed batch (prompts, completions of uneven lengths, advantages of both signs, old
    log-probs that put ratios outside the clip range, reference log-probs): our loss (summed
    over the micro-batch, divided by the step's count) and every weight's gradient equal TRL's."""
    from nanotune.weights import convert

    hf, ours = hf_and_ours(fixture)
    g = torch.Generator().manual_seed(5)
    N, P, L = 6, 5, 7  # completions, prompt tokens (GPT-2's absolute positions: no left pad)
    lengths = [7, 3, 5, 1, 7, 4]
    prompt = torch.randint(3, 1000, (N, P), generator=g)
    completion = torch.randint(3, 1000, (N, L), generator=g)
    cmask = torch.tensor([[1] * n + [0] * (L - n) for n in lengths])
    completion = completion * cmask  # padding id 0 after each completion
    advantages = torch.randn(N, generator=g)
    temp, beta, eps, eps_high = 0.7, 0.05, 0.2, 0.28
    # The policy's own log-probs, then old ones moved so that some ratios leave [1-eps, 1+eps_high].
    obj = GRPOObjective(
        None,
        [Prompt(prompt[i].tolist(), "", "", f"row {i}") for i in range(N)],
        [],
        num_generations=2,
        temperature=temp,
        max_new_tokens=L,
        beta=beta,
        epsilon=eps,
        epsilon_high=eps_high,
        num_iterations=2,  # old log-probs are used
        loss_type=loss_type,
        reference=lambda m: None,
    )
    ours_batch = obj._batch(
        obj.prompts,
        [completion[i, : lengths[i]].tolist() for i in range(N)],
        [False] * N,
        advantages,
    )
    with torch.no_grad():
        current = completion_logps(ours, ours_batch, temp)
    keep = ours_batch["targets"] != -100
    old = (current + torch.randn(current.shape, generator=g) * 0.3) * keep
    ref = (current + torch.randn(current.shape, generator=g) * 0.5) * keep

    def completion_frame(x):  # our [N, T] target frame -> TRL's [N, L]
        out = torch.zeros(N, L)
        for i in range(N):
            out[i, : lengths[i]] = x[i, P - 1 : P - 1 + lengths[i]]
        return out

    inputs = {
        "prompt_ids": prompt,
        "prompt_mask": torch.ones(N, P, dtype=torch.long),
        "completion_ids": completion,
        "completion_mask": cmask,
        "advantages": advantages,
        "old_per_token_logps": completion_frame(old),
        "ref_per_token_logps": completion_frame(ref),
        "num_items_in_batch": cmask.sum(),
    }
    trl_value, trl_metrics = trl_grpo_loss(
        hf, inputs, loss_type=loss_type, beta=beta, eps=eps, eps_high=eps_high, temp=temp, L=L
    )
    hf.zero_grad()
    trl_value.backward()

    ours_batch |= {"old_logps": old, "ref_logps": ref}
    loss, sums = obj.loss_and_sums(ours, ours_batch)
    value = loss / obj.count(ours_batch)
    value.backward()

    assert abs(float(value) - float(trl_value)) <= 1e-5
    assert abs(float(trl_value)) > 1e-3
    n = obj.count(ours_batch)
    assert float(sums["kl"]) / n == pytest.approx(trl_metrics["kl"][0], abs=1e-5)
    region = trl_metrics["clip_ratio/region_mean"][0]
    assert float(sums["clip_fraction"]) / n == pytest.approx(region, abs=1e-6) and region > 0
    ours_params = dict(ours.named_parameters(remove_duplicate=False))
    grads = convert.to_hf({k: p.grad for k, p in ours_params.items()}, ours.config)
    theirs = {k: p.grad for k, p in hf.named_parameters()}
    assert set(theirs) <= set(grads)
    worst = max(float((grads[k] - theirs[k]).abs().max()) for k in theirs)
    largest = max(float(t.abs().max()) for t in theirs.values())
    assert worst <= 1e-5 and largest > 1e-4


# ---- advantages and rewards ---------------------------------------------------------------------


def test_group_advantages_are_trls():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0], dtype=torch.float64)
    adv, zero = group_advantages(rewards, 4, "group")
    std = torch.tensor([1.0, 0, 0, 1]).std()
    assert torch.allclose(adv[:4], (rewards[:4] - 0.5) / (std + 1e-4))
    assert adv[4:].abs().max() == 0 and zero.tolist() == [False] * 4 + [True] * 4
    adv, _ = group_advantages(rewards, 4, "batch")
    assert torch.allclose(adv[:4], (rewards[:4] - 0.5) / (rewards.std() + 1e-4))
    adv, _ = group_advantages(rewards, 4, "none")
    assert adv[:4].tolist() == [0.5, -0.5, -0.5, 0.5]


def test_a_reward_that_raises_or_is_not_finite_names_itself_and_the_row():
    def boom(completions, **kw):
        if "b" in completions:
            raise KeyError("answer")
        return [0.0] * len(completions)

    def nan(completions, **kw):
        return [1.0, float("nan")]

    args = (["a", "b"], ["p", "p"], ["r", "r"], [[1], [2]], ["data.train[0]", "data.train[7]"])
    with pytest.raises(
        NanotuneError, match=r"reward boom raised KeyError: 'answer' on data.train\[7\]"
    ):
        score([Reward("boom", boom)], *args)
    with pytest.raises(NanotuneError, match=r"reward nan gave nan for data.train\[7\]"):
        score([Reward("nan", nan)], *args)
    out = score([Reward("one", lambda c, **kw: [1, 2.5])], *args)
    assert out.tolist() == [[1.0], [2.5]]


def test_builtin_rewards():
    from nanotune.training.rewards import contains, exact_match, format_reward, numeric_match

    done = ["12", "7 + 5 = 12", "To add 7 and 5,", " Twelve. ", "1,200 apples"]
    ref = ["12", "12", "12", "twelve", "1200"]
    assert numeric_match(done, reference=ref) == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert exact_match(done, reference=ref) == [1.0, 0.0, 0.0, 1.0, 0.0]
    assert contains(done, reference=ref) == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert format_reward(r"\s*-?\d+\s*")(done) == [1.0, 0.0, 0.0, 0.0, 0.0]
    with pytest.raises(NanotuneError, match="rl.format_pattern"):
        format_reward("(")


def test_rewards_from_config_and_python(tmp_path):
    from nanotune.training.rewards import build_rewards
    from nanotune.training.rl_config import RLConfig

    (tmp_path / "mine.py").write_text(
        "def shout(completions, **kw):\n    return [float(c.isupper()) for c in completions]\n"
    )
    cfg = RLConfig(
        algorithm="grpo",
        rewards=["numeric_match", f"{tmp_path}/mine.py:shout", "length"],
        reward_weights=[1.0, 0.5, 0.1],
        max_new_tokens=4,
    )

    def python_fn(completions, **kw):
        return [0.25] * len(completions)

    rewards = build_rewards(cfg, [python_fn])
    assert [(r.name, r.weight) for r in rewards] == [
        ("numeric_match", 1.0),
        (f"{tmp_path}/mine.py:shout", 0.5),
        ("length", 0.1),
        ("python_fn", 1.0),
    ]
    out = score(rewards, ["HI 3", "x"], ["p", "p"], ["3", "3"], [[1, 2], [5]], ["a", "b"])
    assert out.tolist() == [[1.0, 1.0, -0.5, 0.25], [0.0, 0.0, -0.25, 0.25]]
    with pytest.raises(NanotuneError, match="has no function 'nope'"):
        build_rewards(RLConfig(rewards=[f"{tmp_path}/mine.py:nope"]))
    with pytest.raises(NanotuneError, match="no file"):
        build_rewards(RLConfig(rewards=["missing.py:f"]))
    with pytest.raises(NanotuneError, match="neither a built-in reward"):
        RLConfig(rewards=["numbers"])
    with pytest.raises(NanotuneError, match="2 weights for 1 rewards"):
        RLConfig(rewards=["format"], reward_weights=[1.0, 2.0])
    with pytest.raises(NanotuneError, match="num_generations: must be at least 2"):
        RLConfig(num_generations=1)


def test_reward_model_reward_scores_prompt_and_completion(tmp_path, gpt2_tokenizer_dir):
    import shutil

    from transformers import GPT2Config, GPT2ForSequenceClassification

    from nanotune.config import RunConfig
    from nanotune.eval import RewardModel
    from nanotune.jobs import grpo

    torch.manual_seed(0)
    folder = tmp_path / "rm"
    cfg = GPT2Config(
        vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=4, num_labels=1,
        pad_token_id=50256, initializer_range=0.2,
    )  # fmt: skip
    GPT2ForSequenceClassification(cfg).save_pretrained(folder)
    for f in gpt2_tokenizer_dir.iterdir():
        shutil.copy2(f, folder / f.name)
    run = RunConfig.from_dict(
        {
            "data": {"source": "x.jsonl"},
            "rl": {"algorithm": "grpo", "rewards": ["reward_model"], "reward_model": str(folder)},
        }
    )
    rewards = grpo.rewards(run)
    done, prompts = ["Seven minutes.", "no"], ["How long to boil an egg?", "Say yes."]
    out = score(rewards, done, prompts, ["", ""], [[1], [2]], ["a", "b"])
    want = RewardModel(str(folder)).score(prompts, done)
    assert out[:, 0].tolist() == pytest.approx(want, abs=1e-6) and want[0] != want[1]
    with pytest.raises(NanotuneError, match="needs rl.reward_model"):
        RunConfig.from_dict(
            {
                "data": {"source": "x.jsonl"},
                "rl": {"algorithm": "grpo", "rewards": ["reward_model"]},
            }
        )


def test_builtin_arithmetic_is_every_problem_once():
    from nanotune.data.builtin import arithmetic

    rows = list(arithmetic())
    assert len(rows) == 13 * 13 + 13 * 14 // 2 == len({r["prompt"] for r in rows})
    for r in rows:
        a, op, b = r["prompt"].removeprefix("What is ").removesuffix("?").split()
        assert int(r["completion"]) == (int(a) + int(b) if op == "+" else int(a) - int(b)) >= 0


# ---- whole runs ---------------------------------------------------------------------------------

ROWS = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(6) for b in range(6)]


def grpo_config(folder, out, **rl) -> dict:
    return {
        "model": str(folder),
        "data": {"format": "completion", "val_fraction": 0.2},
        "method": {"name": "lora", "r": 4, "alpha": 8},
        "train": {
            "max_steps": 4,
            "micro_batch_size": 4,
            "grad_accum": 2,
            "lr": 1e-2,
            "seed": 3,
            "dtype": "float32",
            "save_every": 1,
        },
        "rl": {
            "algorithm": "grpo",
            "num_generations": 4,
            "max_new_tokens": 6,
            "beta": 0.05,
            "num_iterations": 2,
            "rewards": ["numeric_match", "length"],
            "reward_weights": [1.0, 0.1],
            **rl,
        },
        "eval": {"metrics": ["exact_match"], "max_new_tokens": 6},
        "output_dir": str(out),
    }


def test_grpo_run_logs_rollout_metrics_and_heldout_reward(tiny_llama_dir, tmp_path):
    import json

    import nanotune

    seen = []

    def first_char_is_digit(completions, **kw):
        seen.append(len(completions))
        return [float(c[:1].isdigit()) for c in completions]

    result = nanotune.train(
        grpo_config(tiny_llama_dir, tmp_path / "run"),
        data={"train": ROWS},
        rewards=[first_char_is_digit],
        progress=False,
    )
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    # Generation at steps 1 and 3 (num_iterations 2): its metrics come with those steps.
    generated = [r for r in steps if "reward" in r]
    assert [r["step"] for r in generated] == [1, 3]
    for key in (
        "rewards/numeric_match/mean",
        "rewards/first_char_is_digit/std",
        "kl",
        "advantage_std",
        "clip_fraction",
        "completion_length_mean",
        "zero_std_fraction",
    ):
        assert key in generated[0], key
    # held-out (7 val prompts) before, 2 generations of 2 prompts x 4 completions, after
    assert seen == [7, 8, 8, 7]
    assert "rl_reward" in result.before and "rl_reward" in result.after
    assert "exact_match" in result.after
    from nanotune.eval.report import curves

    series = curves(records)  # what the report plots
    assert [s for s, _ in series["reward"]] == [1, 3] and len(series["kl"]) == 4
    assert "rewards/first_char_is_digit/mean" in series and "rewards/length/std" not in series
    assert "grpo" in (tmp_path / "run" / "report.html").read_text()


def test_full_fine_tuning_with_beta_keeps_a_frozen_reference_copy(tiny_llama_dir, tmp_path):
    """beta > 0 without adapters to switch off: the reference is a frozen copy of the model as
    it was before training, made only then (LoRA's is the model with its adapters off). The KL
    to it is 0 at the first step and grows once the policy moves."""
    import json

    import nanotune
    from nanotune.jobs.grpo import reference_policy
    from nanotune.methods import MethodConfig, adapters_disabled, apply_method
    from nanotune.weights import load_model

    lora, _ = _lora_model(tiny_llama_dir)
    assert reference_policy(lora) is adapters_disabled  # no copy
    model, _ = load_model(tiny_llama_dir)
    model = apply_method(model, MethodConfig(name="full"))
    reference = reference_policy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # training moves the policy...
    with reference(model) as ref:
        assert ref is not model and not any(p.requires_grad for p in ref.parameters())
        for k, v in ref.state_dict().items():  # ...not its reference
            assert torch.equal(v, before[k]), k

    cfg = grpo_config(tiny_llama_dir, tmp_path / "run", num_iterations=1, beta=0.5)
    cfg["method"] = {"name": "full"}
    cfg["train"] |= {"max_steps": 3, "lr": 1e-3, "save_every": 0}
    cfg["eval"]["max_examples"] = 1

    def first_token_parity(completions, completion_ids, **kw):
        return [float(ids[0] % 2) if ids else 0.0 for ids in completion_ids]

    nanotune.train(cfg, data={"train": ROWS}, rewards=[first_token_parity], progress=False)
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    kl = [r["kl"] for r in rows if "kl" in r]
    assert len(kl) == 3 and kl[0] == pytest.approx(0.0, abs=1e-7) and kl[-1] > 1e-6


# ---- the batched sampler (one uniform per row, inverse CDF) ------------------------------------


def test_batched_sampling_of_a_row_does_not_depend_on_the_rows_beside_it():
    """Rows with different temperatures, top_k and top_p (and a greedy one), sampled together,
    pick what each picks alone with the same uniform."""
    from nanotune.generate import GenerationConfig, sample_rows

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 300, generator=g) * 3
    configs = [
        GenerationConfig(temperature=1.0),
        GenerationConfig(temperature=0.7, top_k=5),
        GenerationConfig(temperature=0.0),
        GenerationConfig(temperature=1.3, top_p=0.8),
        GenerationConfig(temperature=0.9, top_k=40, top_p=0.5),
    ]
    for _ in range(50):
        u = torch.rand(5, generator=g)
        together, ok = sample_rows(logits, configs, u)
        assert ok.all()
        alone = [
            int(sample_rows(logits[i : i + 1], configs[i : i + 1], u[i : i + 1])[0])
            for i in range(5)
        ]
        assert together.tolist() == alone
        assert together[2] == logits[2].argmax()


def test_inverse_cdf_sampling_draws_the_filtered_distribution():
    """Over a grid of uniforms the picks' frequencies are the probabilities after temperature,
    top_k and top_p (no filtered-out token is ever picked), as torch.multinomial's would be."""
    from nanotune.generate import GenerationConfig, sample_rows

    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05, 0.0]]))
    n = 20_000
    u = (torch.arange(n) + 0.5) / n  # evenly spread: frequencies equal the probabilities
    cases = [
        (GenerationConfig(temperature=1.0), [0.5, 0.2, 0.15, 0.1, 0.05, 0.0]),
        (GenerationConfig(temperature=1.0, top_k=2), [5 / 7, 2 / 7, 0, 0, 0, 0]),
        (
            GenerationConfig(temperature=1.0, top_p=0.8),
            [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0, 0],
        ),
    ]
    for config, want in cases:
        tokens, ok = sample_rows(logits.expand(n, -1), [config] * n, u)
        assert ok.all()
        freq = torch.bincount(tokens, minlength=6).double() / n
        assert torch.allclose(freq, torch.tensor(want, dtype=torch.float64), atol=1e-3), config
    hot = GenerationConfig(temperature=2.0)  # p ** (1/2), renormalised
    tokens, _ = sample_rows(logits.expand(n, -1), [hot] * n, u)
    want = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05, 0.0]).sqrt()
    freq = torch.bincount(tokens, minlength=6).float() / n
    assert torch.allclose(freq, want / want.sum(), atol=1e-3)
    # The largest uniform below 1 still picks a token with probability (never the zero one).
    top = torch.tensor([1.0 - 2**-24])
    assert int(sample_rows(logits, [GenerationConfig(temperature=1.0)], top)[0]) == 4


def test_a_row_whose_probabilities_are_not_finite_is_flagged_alone():
    from nanotune.generate import GenerationConfig, sample_rows

    logits = torch.randn(3, 50)
    logits[1, 7] = float("nan")
    configs = [GenerationConfig(temperature=1.0)] * 3
    _, ok = sample_rows(logits, configs, torch.rand(3))
    assert ok.tolist() == [True, False, True]


# ---- generation through the engine equals `nanotune generate` -----------------------------------


def _lora_model(folder, seed=0):
    from nanotune.methods import MethodConfig, apply_method
    from nanotune.weights import load_model

    torch.manual_seed(seed)
    model, tok = load_model(folder)
    model = apply_method(model, MethodConfig(name="lora", r=4, alpha=8))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # adapters that change the output (B starts at zero)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.train(), tok


def _engine_objective(model, tok, prompts, temperature):
    from nanotune.decoding.engine import Engine

    engine = Engine(model, tok, max_batch=16, prefix_cache_mb=0, route_adapters=False)
    model.train()  # as the trainer holds it; generation switches to eval and back
    return GRPOObjective(
        engine,
        [Prompt(p, "", "", f"row {i}") for i, p in enumerate(prompts)],
        [],
        num_generations=3,
        temperature=temperature,
        top_p=0.9,
        max_new_tokens=8,
        seed=5,
        pad_id=0,
    )


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_engine_generation_with_live_adapters_equals_generate(tiny_llama_dir, temperature):
    """The policy's completions from the batched engine (6 at once, the model's own LoRA layers
    live) are what `generate` gives for each prompt alone with the same weights and seed."""
    from nanotune.generate import GenerationConfig, generate_ids

    model, tok = _lora_model(tiny_llama_dir)
    prompts = [tok.encode(t) for t in ("2+3=", "the cat sat on", "x")]
    obj = _engine_objective(model, tok, prompts, temperature)
    ids, truncated = obj.generate(model, [0, 2], step=4)
    assert model.training  # handed back in training mode
    assert "lora" in type(model.blocks[0].attn.qkv).__name__.lower()  # modules left as they were
    rows = [0, 0, 0, 2, 2, 2]
    for r, (row, got) in enumerate(zip(rows, ids, strict=True)):
        cfg = GenerationConfig(
            max_new_tokens=8, temperature=temperature, top_p=0.9, seed=obj.sampling_seed(4, r)
        )
        want = generate_ids(model.eval(), [prompts[row]], cfg, tok)[0]
        assert got[: len(want)] == want and len(got) - len(want) in (0, 1)
        assert truncated[r] == (len(want) == 8)
    if temperature:  # the seeds differ per completion, so a group is not 3 copies
        assert ids[0] != ids[1] or ids[1] != ids[2]


def test_decode_copies_are_exact_in_float32_and_put_the_layers_back(tiny_llama_dir):
    """float32: the LoRA layers' decode copies (scaled B computed once) give bit-identical
    logits; on exit the model has its own modules again (the trainable parameters included)."""
    from nanotune.decoding.lora import decode_copies

    model, tok = _lora_model(tiny_llama_dir)
    model.eval()
    ids = torch.tensor([tok.encode("the cat sat on the mat")])
    before = dict(model.named_modules())
    with torch.no_grad():
        want = model(ids)
        with decode_copies(model):
            assert "ScaledB" in type(model.blocks[0].attn.qkv).__name__
            got = model(ids)
    assert torch.equal(got, want)
    assert dict(model.named_modules()) == before


@pytest.mark.skipif(
    not __import__("nanotune.models.linear", fromlist=["x"]).ONEDNN_BF16,
    reason="oneDNN does not multiply bf16 on this CPU",
)
def test_decode_copies_under_bf16_autocast_are_the_merged_weights_packed(tiny_llama_dir):
    """bf16 autocast: every LoRA layer decodes through its merged weight rounded to bf16 (and
    the head through its bf16 weight), packed. Their logits are as close to the float32 model's
    as the live layers' bf16 ones are (and far from the model without its adapters); the copies
    are gone on exit."""
    from nanotune.decoding.lora import decode_copies
    from nanotune.methods.lora import adapters_disabled
    from nanotune.models.linear import PackedLinear

    model, tok = _lora_model(tiny_llama_dir)
    model.eval()
    ids = torch.tensor([tok.encode("the cat sat on the mat")])
    with torch.no_grad():
        exact = model(ids)
        with adapters_disabled(model):
            bare = model(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            live = model(ids).float()
            with decode_copies(model):
                packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
                assert len(packed) == 4 * len(model.blocks) + 1  # block linears and the head
                got = model(ids).float()
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
    err = (got - exact).abs().max()
    assert err <= 1.5 * (live - exact).abs().max()
    assert (bare - exact).abs().max() > 5 * err


def test_generation_in_bf16_autocast_then_training(tiny_llama_dir):
    """Sampled under the training precision (bf16 autocast: LoRA slices and bf16 weight copies
    are made while decoding), then trained: nothing made during generation is an inference
    tensor the backward pass or the next bf16 matmul would refuse."""
    model, tok = _lora_model(tiny_llama_dir)
    prompts = [tok.encode(t) for t in ("2+3=", "x")]
    obj = _engine_objective(model, tok, prompts, 1.0)
    obj.autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    obj.rewards = [Reward("len", lambda c, completion_ids, **kw: [len(i) for i in completion_ids])]
    rollout = obj.rollout(model, torch.tensor([0, 1]), step=1)
    with obj.autocast():
        loss, _ = obj.loss_and_sums(model, rollout["batch"])
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_nothing_the_sampling_allocates_outlives_it(tiny_llama_dir, monkeypatch):
    """Before the loss and its backward run, the sampling phase's KV cache and its decode copies
    of the weights (bf16 packed under autocast) are freed: a weak reference to each is dead once
    the rollout returns, as it is when decoding fails halfway."""
    import weakref

    from nanotune.decoding import engine as engine_mod
    from nanotune.models import linear as linear_mod

    made = []
    reserve, packed_init = engine_mod._SlotCache.reserve, linear_mod.PackedLinear.__init__

    def recording_reserve(self, *a, **kw):
        reserve(self, *a, **kw)
        made.extend(weakref.ref(t) for t in (*self.k, *self.v))

    def recording_init(self, *a, **kw):
        packed_init(self, *a, **kw)
        made.append(weakref.ref(self.weight))

    monkeypatch.setattr(engine_mod._SlotCache, "reserve", recording_reserve)
    monkeypatch.setattr(linear_mod.PackedLinear, "__init__", recording_init)
    model, tok = _lora_model(tiny_llama_dir)
    prompts = [tok.encode(t) for t in ("2+3=", "x")]
    obj = _engine_objective(model, tok, prompts, 1.0)
    obj.autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    obj.rewards = [Reward("len", lambda c, completion_ids, **kw: [len(i) for i in completion_ids])]
    obj.rollout(model, torch.tensor([0, 1]), step=1)
    assert made and all(r() is None for r in made)
    assert obj.engine._cache.k == [] and obj.engine._active == []

    made.clear()  # a forward that fails halfway leaves no cache behind either
    real = model.hidden

    def failing(*a, **kw):
        if made:
            raise RuntimeError("out of memory")
        return real(*a, **kw)

    monkeypatch.setattr(model, "hidden", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        obj.rollout(model, torch.tensor([0, 1]), step=2)
    monkeypatch.undo()
    assert made and all(r() is None for r in made)
    assert obj.engine._cache.k == [] and obj.engine._active == []


def test_engine_generation_during_training_equals_nanotune_generate(
    tiny_llama_dir, tmp_path, monkeypatch
):
    """Step 2 of a GRPO run samples (through the engine, adapters live) exactly what
    `nanotune generate` samples from the adapter saved after step 1, with the same seed."""
    import nanotune
    from nanotune.generate import GenerationConfig, generate_ids
    from nanotune.jobs import artifacts

    recorded = {}
    real = GRPOObjective.generate

    def recording(self, model, rows, step, first=0):
        out = real(self, model, rows, step, first)
        recorded[step] = ([self.prompts[i].ids for i in rows for _ in range(self.G)], out[0])
        return out

    def first_token_parity(completions, completion_ids, **kw):  # varies within a group
        return [float(ids[0] % 2) if ids else 0.0 for ids in completion_ids]

    monkeypatch.setattr(GRPOObjective, "generate", recording)
    for steps in (1, 2):
        cfg = grpo_config(tiny_llama_dir, tmp_path / f"run{steps}", num_iterations=1, beta=0.0)
        cfg["train"] |= {"max_steps": steps, "schedule": "constant", "lr": 5e-2}
        cfg["eval"]["max_examples"] = 1
        nanotune.train(cfg, data={"train": ROWS}, rewards=[first_token_parity], progress=False)
    model, tok = artifacts.load(str(tmp_path / "run1" / "final"))
    prompts, completions = recorded[2]
    seed = 3 * 1_000_003 + 2  # GRPOObjective.sampling_seed(step=2, row) with train.seed 3
    for r, (prompt, got) in enumerate(zip(prompts, completions, strict=True)):
        cfg = GenerationConfig(max_new_tokens=6, temperature=1.0, seed=seed * 100_003 + r)
        want = generate_ids(model, [prompt], cfg, tok)[0]
        assert got[: len(want)] == want and len(got) - len(want) in (0, 1)
    # Step 1 did train the adapter that generated step 2: its logits are not the base's.
    base, _ = artifacts.load(str(tiny_llama_dir))
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        assert (model(ids) - base(ids)).abs().max() > 1e-6


@pytest.mark.slow
def test_compiled_sampling_draws_the_eager_completions_as_the_weights_change(
    tiny_llama_dir, tmp_path, monkeypatch
):
    """rl.compile: three steps of a run sample through compiled decode steps exactly the
    completions eager steps sample (float32), though the adapter changes after every step: the
    graphs read the live weights. Steps after the first compile nothing new."""
    from torch._dynamo.utils import counters

    import nanotune

    recorded: dict[bool, list] = {False: [], True: []}
    real = GRPOObjective.generate

    def recording(self, model, rows, step, first=0):
        out = real(self, model, rows, step, first)
        graphs = counters["stats"]["unique_graphs"]
        recorded[self.engine.compiles].append((out[0], graphs, self.engine.compiled_steps))
        return out

    def first_token_parity(completions, completion_ids, **kw):  # varies within a group
        return [float(ids[0] % 2) if ids else 0.0 for ids in completion_ids]

    monkeypatch.setattr(GRPOObjective, "generate", recording)
    torch._dynamo.reset()
    for compile in (False, True):
        cfg = grpo_config(tiny_llama_dir, tmp_path / f"run-{compile}", num_iterations=1)
        cfg["rl"] |= {"compile": compile, "beta": 0.0}
        cfg["train"] |= {"max_steps": 3, "schedule": "constant", "lr": 5e-2}
        cfg["eval"]["max_examples"] = 1
        nanotune.train(cfg, data={"train": ROWS}, rewards=[first_token_parity], progress=False)
    eager, compiled = recorded[False], recorded[True]
    assert len(eager) == len(compiled) == 3
    assert [ids for ids, _, _ in compiled] == [ids for ids, _, _ in eager]
    assert len({str(ids) for ids, _, _ in eager}) == 3  # the steps sampled differently
    assert compiled[-1][2] > 0  # steps did run compiled
    assert compiled[1][1] == compiled[2][1]  # and the third compiled nothing new


# ---- SIGKILL and --resume ------------------------------------------------------------------------

RESUME_SCRIPT = """
import json, os, sys, time
import torch
torch.set_num_threads(1)
import nanotune

folder, out = sys.argv[1], sys.argv[2]
rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(6) for b in range(6)]

def first_token_parity(completions, completion_ids, **kw):
    time.sleep(float(os.environ.get("SLOW", "0")))  # room for the parent to kill us mid-run
    return [float(ids[0] % 2) if ids else 0.0 for ids in completion_ids]

cfg = json.loads(os.environ["GRPO_CONFIG"])
nanotune.train(cfg, data={"train": rows}, rewards=[first_token_parity], progress=False,
               resume="--resume" in sys.argv)
"""


def test_sigkill_then_resume_is_bit_identical(tiny_llama_dir, tmp_path):
    """Killed with no warning (SIGKILL) while sampling, twice, then resumed from a checkpoint
    inside a generation batch (num_iterations 2: step 4 trains on step 3's completions), a run
    ends with the uninterrupted run's adapter, bit for bit, and the same per-step metrics."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    script = tmp_path / "grpo_script.py"
    script.write_text(RESUME_SCRIPT)

    def env(run, slow="0"):
        cfg = grpo_config(tiny_llama_dir, run, temperature=0.9, top_p=0.95)
        cfg["train"] |= {"max_steps": 6}
        cfg["eval"]["max_examples"] = 2
        return {**os.environ, "OMP_NUM_THREADS": "1", "SLOW": slow, "GRPO_CONFIG": json.dumps(cfg)}

    def steps(run):
        path = run / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return [json.loads(x) for x in lines if x.endswith("}") and '"loss"' in x]

    whole = tmp_path / "whole"
    subprocess.run([sys.executable, script, tiny_llama_dir, whole], env=env(whole), check=True)
    run = tmp_path / "run"
    kills = 0
    for resume, kill_after in ((False, 2), (True, 4)):  # killed within step 3, then step 5
        args = [sys.executable, script, tiny_llama_dir, run, *(["--resume"] if resume else [])]
        proc = subprocess.Popen(args, env=env(run, "0.3"), stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if max([0, *(r["step"] for r in steps(run))]) >= kill_after:
                break
            time.sleep(0.02)
        time.sleep(0.15)  # inside the next step's generation (the reward sleeps 0.3 s)
        assert proc.poll() is None, proc.stderr.read()
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        kills += 1
    # A kill right after step 3's checkpoint: step 4 reuses step 3's generation batch, which
    # only the checkpoint holds (the weights have moved since it was sampled).
    import shutil

    from nanotune.training.checkpoint import step_dirs

    assert [d.name for d in step_dirs(run / "checkpoints")] == ["step-3", "step-4"]
    shutil.rmtree(run / "checkpoints" / "step-4")
    subprocess.run(
        [sys.executable, script, tiny_llama_dir, run, "--resume"], env=env(run), check=True
    )
    want = load_file(str(whole / "final" / "adapter_model.safetensors"))
    got = load_file(str(run / "final" / "adapter_model.safetensors"))
    assert kills == 2 and want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert any(float(v.abs().max()) > 0 for k, v in want.items() if "lora_B" in k)  # it trained
    # Wall-clock figures differ, and each process's first record carries the counts.
    drop = ("elapsed_s", "tokens_per_s", "trainable_params", "total_params", "precision")
    strip = [{k: v for k, v in r.items() if k not in drop} for r in steps(whole)]
    assert [{k: v for k, v in r.items() if k not in drop} for r in steps(run)] == strip
