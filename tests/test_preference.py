"""Preference objectives: the loss functions, response log-probs, the reference policy, and parity
with TRL (a test-only dependency) on tiny random GPT-2 and Llama models."""

from __future__ import annotations

import copy
import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_config

from nanotune.data import PreferenceExample
from nanotune.data.batching import collate_preference
from nanotune.jobs.reference import (
    adapters_are_the_reference,
    attach_reference,
    load_reference,
    reference_context,
    save_reference,
)
from nanotune.methods import MethodConfig, adapters_disabled, apply_method
from nanotune.models import Transformer
from nanotune.training.losses import token_logprobs
from nanotune.training.preference import (
    PreferenceObjective,
    bradley_terry_loss,
    dpo_loss,
    orpo_loss,
    response_logps,
    simpo_loss,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def random_pairs(n: int, vocab: int, seed: int = 0, low: int = 1) -> list[PreferenceExample]:
    """Pairs of uneven prompt and response lengths (so padding and masks matter)."""
    g = torch.Generator().manual_seed(seed)

    def ids(k: int) -> list[int]:
        return torch.randint(low, vocab, (k,), generator=g).tolist()

    return [
        PreferenceExample(ids(2 + 3 * i % 5), ids(1 + (5 * i) % 6), ids(2 + (3 * i) % 4))
        for i in range(n)
    ]


def tiny_model(family: str = "gpt2", seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny_config(family))


# ---- the loss functions ----------------------------------------------------------------------


def test_token_logprobs_fused_backward_equals_log_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(70, 50, generator=g, dtype=torch.float64) * 3  # 2 full blocks and a part
    targets = torch.randint(0, 50, (70,), generator=g)
    upstream = torch.randn(70, generator=g, dtype=torch.float64)
    x = logits.clone().requires_grad_(True)
    ours = token_logprobs(x * 1.0, targets)  # * 1.0: the function owns (and reuses) its buffer
    (ours * upstream).sum().backward()
    y = logits.clone().requires_grad_(True)
    ref = torch.log_softmax(y, -1).gather(1, targets[:, None]).squeeze(1)
    (ref * upstream).sum().backward()
    assert (ours - ref).abs().max() < 1e-12 and (x.grad - y.grad).abs().max() < 1e-12
    with torch.no_grad():
        assert (token_logprobs(logits, targets) - ref).abs().max() < 1e-12


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_response_logps_of_pair_rows_equal_each_sequence_run_alone(family):
    # One row per pair (prompt once, chosen and rejected as branches) must give what running
    # prompt + chosen and prompt + rejected as separate sequences gives: values and gradients.
    model = tiny_model(family).double()  # float64: equal up to rounding, not to float32 noise
    pairs = random_pairs(5, 96)
    batch = collate_preference(pairs, pad_id=0)
    sums, counts = response_logps(model, batch)
    params = [p for p in model.parameters()]
    weights = torch.tensor([1.0, -0.5], dtype=torch.float64)
    grads = torch.autograd.grad((sums * weights).sum(), params)
    ref = torch.zeros(5, 2, dtype=torch.float64)
    for b, ex in enumerate(pairs):
        for j, response in enumerate((ex.chosen, ex.rejected)):
            ids = torch.tensor([ex.prompt + response])
            logp = torch.log_softmax(model(ids)[0], -1)
            p = len(ex.prompt)
            ref[b, j] = logp[p - 1 : -1].gather(1, torch.tensor(response)[:, None]).sum()
    ref_grads = torch.autograd.grad((ref * weights).sum(), params)
    assert (sums - ref).abs().max() < 1e-12
    assert max((a - b).abs().max() for a, b in zip(grads, ref_grads, strict=True)) < 1e-12
    assert counts.tolist() == [[len(e.chosen), len(e.rejected)] for e in pairs]


def test_dpo_losses_have_their_closed_forms():
    c, r = torch.tensor([-3.0, -7.0]), torch.tensor([-5.0, -4.0])
    rc, rr = torch.tensor([-4.0, -6.0]), torch.tensor([-4.5, -4.5])
    h = (c - rc) - (r - rr)  # [1.5, -1.5]
    beta = 0.3
    assert torch.allclose(dpo_loss(c, r, rc, rr, beta=beta), F.softplus(-beta * h))
    assert torch.allclose(dpo_loss(c, c, c, c), torch.full((2,), math.log(2)))  # no preference yet
    # Conservative DPO: a mix of the loss for the label and for its flip.
    e = 0.2
    mixed = (1 - e) * dpo_loss(c, r, rc, rr, beta=beta) + e * dpo_loss(r, c, rr, rc, beta=beta)
    assert torch.allclose(dpo_loss(c, r, rc, rr, beta=beta, label_smoothing=e), mixed)
    assert torch.allclose(dpo_loss(c, r, rc, rr, beta=beta, loss="hinge"), torch.relu(1 - beta * h))
    nc, nr = torch.tensor([2, 4]), torch.tensor([5, 1])
    avg = (c - rc) / nc - (r - rr) / nr
    ipo = dpo_loss(c, r, rc, rr, beta=beta, loss="ipo", chosen_tokens=nc, rejected_tokens=nr)
    assert torch.allclose(ipo, (avg - 1 / (2 * beta)) ** 2)
    with pytest.raises(ValueError, match="token counts"):
        dpo_loss(c, r, rc, rr, loss="ipo")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:You are importing from .trl.experimental.")
def test_simpo_and_orpo_equal_trls_cpo_and_orpo_losses():
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    g = torch.Generator().manual_seed(3)
    nc, nr = torch.tensor([3, 10, 1, 7]), torch.tensor([4, 2, 9, 7])
    c = -torch.rand(4, generator=g, dtype=torch.float64) * nc * 2
    r = -torch.rand(4, generator=g, dtype=torch.float64) * nr * 2
    c[2] = -1e-4  # an almost certain response: log(1 - p) must stay finite
    trainer = SimpleNamespace(
        alpha=0.0, beta=2.0, simpo_gamma=0.8, label_smoothing=0.1, loss_type="simpo"
    )
    trainer.accelerator = SimpleNamespace(device="cpu")
    # TRL's CPO/ORPO average the log-probs over response tokens before their losses.
    trl_simpo = CPOTrainer.cpo_loss(trainer, c / nc, r / nr)[0]
    ours = simpo_loss(c, r, nc, nr, beta=2.0, gamma=0.8, label_smoothing=0.1)
    assert (ours - trl_simpo).abs().max() < 1e-12
    trainer.beta = 0.25
    # TRL's odds ratio term is lam * logsigmoid(log odds), computed in float32.
    trl_ratio = ORPOTrainer.odds_ratio_loss(trainer, c / nc, r / nr)[0].double()
    ours = orpo_loss(c, r, nc, nr, lam=0.25)
    assert torch.isfinite(ours).all()
    assert (ours - (-c / nc - trl_ratio)).abs().max() < 1e-7


def test_bradley_terry_loss_and_margin():
    rc, rr = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 1.0])
    assert torch.allclose(bradley_terry_loss(rc, rr), -F.logsigmoid(rc - rr))
    margin = torch.tensor([1.0, 0.0])
    assert torch.allclose(bradley_terry_loss(rc, rr, margin), -F.logsigmoid(rc - rr - margin))


@pytest.mark.parametrize("objective", ["dpo", "simpo", "orpo"])
def test_objective_sums_pairs_and_reports_preference_metrics(objective):
    model = tiny_model("llama")
    pairs = random_pairs(6, 96, seed=1)
    batch = collate_preference(pairs, pad_id=0)
    with torch.no_grad():
        batch["ref_logps"] = response_logps(model, batch)[0] - 0.5  # any fixed reference
    obj = PreferenceObjective(objective, beta=0.5)
    assert obj.count(batch) == 6
    losses, chosen_rewards, rejected_rewards, logps = obj.pairs(model, batch)
    assert losses.shape == (6,) and torch.isclose(obj.loss_sum(model, batch), losses.sum())
    metrics = obj.summarize(obj.eval_sums(model, batch))
    assert metrics["loss"] == pytest.approx(float(losses.detach().mean()), rel=1e-6)
    correct = (chosen_rewards > rejected_rewards).float().mean()
    assert metrics["reward_accuracy"] == pytest.approx(float(correct))
    margin = (chosen_rewards - rejected_rewards).mean()
    assert metrics["reward_margin"] == pytest.approx(float(margin), rel=1e-6)
    assert metrics["logps_chosen"] == pytest.approx(float(logps[:, 0].detach().mean()), rel=1e-6)
    assert metrics["logps_rejected"] == pytest.approx(float(logps[:, 1].detach().mean()), rel=1e-6)


STEP_METRICS = ("reward_accuracy", "reward_margin", "rewards_chosen", "rewards_rejected")


@pytest.mark.parametrize("objective", ["dpo", "reward"])
def test_each_training_step_logs_the_preference_metrics_of_its_own_forward(objective, tmp_path):
    """metrics.jsonl's train rows carry reward accuracy, margin, rewards and (policies) log-probs:
    means over the step's pairs (summed over its micro-batches), equal to recomputing them on
    the same batch with the weights the step started from."""
    from nanotune.data.batching import epoch_batches
    from nanotune.methods import SequenceClassifier
    from nanotune.training import TrainConfig, Trainer

    model = tiny_model("llama", seed=3)
    pairs = random_pairs(12, 96, seed=5)
    if objective == "reward":
        torch.manual_seed(4)
        model = SequenceClassifier(model, 1, ["reward"])
    else:  # a full fine-tune: the reference log-probs are the untrained model's, in the batch
        attach_reference(model, {"train": pairs}, batch_size=4, pad_id=0)
    batches = list(epoch_batches(pairs, 6, 0, 0, task="preference", pad_id=0, shuffle=False))
    config = TrainConfig(lr=2e-2, micro_batch_size=2, grad_accum=3, max_steps=4, device="cpu")
    obj = PreferenceObjective(objective, beta=0.5)
    trainer = Trainer(model, config, lambda e: batches, tmp_path, objective=obj, progress=False)
    started: list[dict] = []  # the weights each step's forward saw, taken just before its update
    trainer.optimizer.register_step_pre_hook(
        lambda *_: started.append(copy.deepcopy(model.state_dict()))
    )
    trainer.fit()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and len(started) == 4
    keys = STEP_METRICS + (("logps_chosen", "logps_rejected") if objective == "dpo" else ())
    margins = []
    for row, weights, batch in zip(rows, started, batches * 2, strict=True):
        assert row["labels"] == 6 and set(keys) <= set(row)
        assert objective == "dpo" or "logps_chosen" not in row
        model.load_state_dict(weights)
        with torch.no_grad():
            losses, chosen, rejected, logps = obj.pairs(model, batch)
        expected = {
            "loss": losses.mean(),
            "reward_accuracy": (chosen > rejected).float().mean(),
            "reward_margin": (chosen - rejected).mean(),
            "rewards_chosen": chosen.mean(),
            "rewards_rejected": rejected.mean(),
        }
        if logps is not None:
            expected |= {"logps_chosen": logps[:, 0].mean(), "logps_rejected": logps[:, 1].mean()}
        for k, v in expected.items():
            assert row[k] == pytest.approx(float(v), rel=1e-5, abs=1e-6), (row["step"], k)
        margins.append(row["reward_margin"])
    if objective == "dpo":  # step 1 is the reference itself: every implicit reward is 0
        assert rows[0]["reward_margin"] == pytest.approx(0, abs=1e-6)
    assert margins[-1] > margins[0]  # training widened the margin: the values are not constant


# ---- the reference policy --------------------------------------------------------------------


def randomise_adapters(model, seed: int = 7) -> None:
    """B starts at zero (policy = reference): perturb it so the comparisons mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


LORA_CASES = {
    "gpt2-lora": ("gpt2", dict(targets="all-linear")),
    "gpt2-qv-dora": ("gpt2", dict(targets=["c_attn.q", "c_attn.v"], dora=True)),
    "llama-lora": ("llama", dict(targets="all-linear")),
}


@pytest.mark.parametrize("case", list(LORA_CASES))
def test_adapters_off_reference_equals_a_separate_frozen_copy(case):
    family, method = LORA_CASES[case]
    model = tiny_model(family)
    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    apply_method(model, MethodConfig(name="lora", r=4, alpha=8, **method))
    randomise_adapters(model)
    batch = collate_preference(random_pairs(6, 96, seed=2), pad_id=0)
    with torch.no_grad():
        policy = response_logps(model, batch)[0]
        with adapters_disabled(model):
            off = response_logps(model, batch)[0]
        ref = response_logps(frozen, batch)[0]
        again = response_logps(model, batch)[0]  # the adapters are back on after the context
    assert (off - ref).abs().max() <= 1e-6
    assert (policy - ref).abs().max() > 1e-2 and torch.equal(again, policy)
    assert adapters_are_the_reference(model) and reference_context(model) is adapters_disabled
    # DPO with the adapters-off reference is DPO against the frozen copy, loss and gradients.
    objective = PreferenceObjective("dpo", beta=0.2, reference=adapters_disabled)
    trained = [p for p in model.parameters() if p.requires_grad]
    loss = objective.loss_sum(model, batch)
    grads = torch.autograd.grad(loss, trained)
    chosen_rejected = response_logps(model, batch)[0]
    expected = dpo_loss(
        chosen_rejected[:, 0], chosen_rejected[:, 1], ref[:, 0], ref[:, 1], beta=0.2
    ).sum()
    expected_grads = torch.autograd.grad(expected, trained)
    assert (loss - expected).abs() <= 1e-6
    assert max((a - b).abs().max() for a, b in zip(grads, expected_grads, strict=True)) <= 1e-6


def test_trained_embeddings_or_full_fine_tuning_need_a_precomputed_reference():
    lora = tiny_model()
    apply_method(lora, MethodConfig(name="lora", r=4, alpha=8, train_embeddings=True))
    full = apply_method(tiny_model(), MethodConfig(name="full"))
    assert reference_context(lora) is None and reference_context(full) is None


@pytest.mark.parametrize("method", ["lora", "full"])
def test_precomputed_reference_equals_on_the_fly(method, tmp_path):
    model = tiny_model("llama")
    apply_method(model, MethodConfig(name=method, r=4, alpha=8, targets="all-linear"))
    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    pairs = random_pairs(7, 96, seed=4)
    stored = attach_reference(model, {"train": pairs}, batch_size=3, pad_id=0)
    assert stored["train"].shape == (7, 2)
    # Training moves the policy: adapters for LoRA, every weight for a full fine-tune.
    if method == "lora":
        randomise_adapters(model)
    else:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    with_ref = collate_preference(pairs, pad_id=0)
    without = {k: v for k, v in with_ref.items() if k != "ref_logps"}
    on_the_fly = PreferenceObjective("dpo", loss="ipo", reference=adapters_disabled)
    if method == "full":  # no adapters to switch off: the on-the-fly reference is a frozen copy
        with torch.no_grad():
            ref = response_logps(frozen, without)[0]
        assert (with_ref["ref_logps"] - ref).abs().max() <= 1e-6
        return
    trained = [p for p in model.parameters() if p.requires_grad]
    precomputed = PreferenceObjective("dpo", loss="ipo")
    a = precomputed.loss_sum(model, with_ref)
    b = on_the_fly.loss_sum(model, without)
    grads_a = torch.autograd.grad(a, trained)
    grads_b = torch.autograd.grad(b, trained)
    assert (a - b).abs() <= 1e-6
    assert max((x - y).abs().max() for x, y in zip(grads_a, grads_b, strict=True)) <= 1e-6
    # Stored with the run, the values come back into fresh examples exactly.
    save_reference(tmp_path / "ref.safetensors", stored)
    fresh = random_pairs(7, 96, seed=4)
    load_reference(tmp_path / "ref.safetensors", {"train": fresh})
    assert [(e.ref_chosen, e.ref_rejected) for e in fresh] == [
        (e.ref_chosen, e.ref_rejected) for e in pairs
    ]
    with pytest.raises(Exception, match="reference log-probs for 7 train pairs but the data has 6"):
        load_reference(tmp_path / "ref.safetensors", {"train": fresh[:6]})


# ---- parity with TRL's DPOTrainer ------------------------------------------------------------


def trl_dpo_loss(policy, reference, batch: dict, *, beta: float, loss: str):
    """TRL DPOTrainer's own `_compute_loss` (its fused LM head, its reference forward, its
    loss) on HF models, with only the trainer's plumbing stood in for."""
    from collections import defaultdict

    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(policy, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    add_fused_lm_head(reference)
    same = SimpleNamespace(device="cpu", gather=lambda x: x, gather_for_metrics=lambda x: x)
    trainer = SimpleNamespace(
        model=policy,
        ref_model=reference,
        accelerator=same,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        aux_loss_enabled=False,
        precompute_ref_logps=False,
        ld_alpha=None,
        f_divergence_type="reverse_kl",
        loss_types=[loss],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    value = DPOTrainer._compute_loss(trainer, policy, batch, return_outputs=False)
    return value, trainer._metrics["eval"]


@pytest.fixture(scope="module")
def hf_pair(request, tmp_path_factory):
    """(HF policy, HF reference, our policy, our reference) of one tiny family: the reference is
    the fixture's random checkpoint, the policy the same with every weight moved."""
    from transformers import AutoModelForCausalLM

    from nanotune.weights import load_model

    def make(fixture: str):
        folder = request.getfixturevalue(fixture)
        reference = AutoModelForCausalLM.from_pretrained(folder).eval()
        policy = AutoModelForCausalLM.from_pretrained(folder).eval()
        g = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
        moved = tmp_path_factory.mktemp("policy")
        policy.save_pretrained(moved)
        for f in folder.iterdir():  # the tokenizer files
            if f.name.startswith(("tokenizer", "vocab", "merges", "special")):
                shutil.copy2(f, moved / f.name)
        ours = load_model(moved)[0].eval()
        ours_ref = load_model(folder)[0].eval().requires_grad_(False)
        return policy, reference, ours, ours_ref

    return make


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
@pytest.mark.parametrize("fixture", ["tiny_gpt2_dir", "tiny_llama_dir"])
def test_dpo_loss_and_gradients_equal_trls_dpo_trainer(fixture, loss, hf_pair):
    """Same models, same pairs: our DPO loss (per pair, meaned) and every weight's gradient equal
    those of TRL's DPOTrainer computation (its concatenated forward and reference forward)."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from nanotune.weights import convert

    policy, reference, ours, ours_ref = hf_pair(fixture)
    pairs = random_pairs(5, 1000, seed=6, low=3)  # ids below 3 are the pad/eos/bos tokens
    pad_id = 0
    trl_batch = DataCollatorForPreference(pad_token_id=pad_id)(
        [
            {"prompt_ids": e.prompt, "chosen_ids": e.chosen, "rejected_ids": e.rejected}
            for e in pairs
        ]
    )
    beta = 0.3
    trl_value, trl_metrics = trl_dpo_loss(policy, reference, trl_batch, beta=beta, loss=loss)
    policy.zero_grad()
    trl_value.backward()

    batch = collate_preference(pairs, pad_id=pad_id)
    with torch.no_grad():
        batch["ref_logps"] = response_logps(ours_ref, batch)[0]
    objective = PreferenceObjective("dpo", beta=beta, loss=loss)
    value = objective.loss_sum(ours, batch) / objective.count(batch)
    value.backward()

    assert abs(float(value.detach()) - float(trl_value.detach())) <= 1e-5
    metrics = objective.summarize(objective.eval_sums(ours, batch))
    assert metrics["reward_margin"] == pytest.approx(trl_metrics["rewards/margins"][0], abs=1e-5)
    assert metrics["logps_chosen"] == pytest.approx(trl_metrics["logps/chosen"][0], abs=1e-4)
    # Our gradients, in HF's names and layouts (Conv1D transposed, q/k/v split).
    ours_params = dict(ours.named_parameters(remove_duplicate=False))
    grads = convert.to_hf({k: p.grad for k, p in ours_params.items()}, ours.config)
    theirs = {k: p.grad for k, p in policy.named_parameters()}
    assert set(theirs) <= set(grads)
    worst = max(float((grads[k] - theirs[k]).abs().max()) for k in theirs)
    largest = max(float(g.abs().max()) for g in theirs.values())
    assert worst <= 1e-5 and largest > 1e-3  # equal, and not equal because all are zero
