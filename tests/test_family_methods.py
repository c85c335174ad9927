"""Every fine-tuning method on every family: one tiny random model per family, built with
transformers' own class and loaded by nanotune, trains a few steps with full, last_n, LoRA, DoRA,
rsLoRA, QLoRA, a classification head, a reward model and DPO. What trains is exactly the method's
parameters and the loss falls; where transformers or peft compute the same thing (a sequence
classifier's scores, a DoRA + rsLoRA adapter and one training step of it) the numbers are equal.

Sequences are 20 tokens, past the window of 8 of the families that slide (Mistral, Gemma 2/3,
Phi-3), so the window masks of training, pooling and preference branches all take part."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from conftest import TINY_INIT
from peft import LoraConfig, get_peft_model

from nanotune.data import PreferenceExample
from nanotune.data.batching import collate_preference
from nanotune.methods import (
    MethodConfig,
    SequenceClassifier,
    adapters_disabled,
    apply_method,
    lora_layers,
    nf4,
)
from nanotune.training.preference import PreferenceObjective, response_logps
from nanotune.weights.hf import load_hf_model
from nanotune.weights.peft import load_adapter

warnings.filterwarnings("ignore")
pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, WINDOW, T = 96, 8, 20
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,  # NF4 blocks of 64 divide every layer
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    initializer_range=TINY_INIT,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
GEMMA = dict(
    head_dim=16,
    query_pre_attn_scalar=16,
    sliding_window=WINDOW,
    tie_word_embeddings=True,
    hidden_activation="gelu_pytorch_tanh",
)
# family -> (config class, model class, overrides)
FAMILIES = {
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(head_dim=16)),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(sliding_window=WINDOW)),
    "smollm3": (
        tf.SmolLM3Config,
        tf.SmolLM3ForCausalLM,
        dict(num_hidden_layers=4, tie_word_embeddings=True),  # layer 3 has no RoPE
    ),
    # Soft-caps of the released models' size: they bite on the scores without pinning the loss.
    "gemma2": (
        tf.Gemma2Config,
        tf.Gemma2ForCausalLM,
        dict(GEMMA, attn_logit_softcapping=5.0, final_logit_softcapping=3.0),
    ),
    "gemma3": (
        tf.Gemma3TextConfig,
        tf.Gemma3ForCausalLM,
        dict(GEMMA, num_hidden_layers=6, rope_theta=50000.0, rope_local_base_freq=10000.0),
    ),
    "phi3": (
        tf.Phi3Config,
        tf.Phi3ForCausalLM,
        dict(partial_rotary_factor=0.5, sliding_window=WINDOW),
    ),
    "gpt_neox": (
        tf.GPTNeoXConfig,
        tf.GPTNeoXForCausalLM,
        dict(rotary_pct=0.5, use_parallel_residual=True, layer_norm_eps=1e-5),
    ),
}
CASES = list(FAMILIES)
# The families' own module names for peft (Phi-3 and GPT-NeoX fuse their projections).
PEFT_TARGETS = {
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def hf_model(family: str):
    config_cls, model_cls, overrides = FAMILIES[family]
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**COMMON, **overrides}))
    with torch.no_grad():  # Gemma's norms start at 0 (x * (1 + 0)) and biases at 0: unmask them
        for name, p in model.named_parameters():
            if ("norm" in name and family.startswith("gemma")) or name.endswith("bias"):
                p.normal_(0, 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """family -> an HF folder transformers saved."""
    out = {}
    for family in CASES:
        out[family] = tmp_path_factory.mktemp(family)
        hf_model(family).save_pretrained(out[family])
    return out


def ids(seed: int = 1, rows: int = 4) -> torch.Tensor:
    return torch.randint(3, VOCAB, (rows, T), generator=torch.Generator().manual_seed(seed))


def lm_loss(model, x: torch.Tensor) -> torch.Tensor:
    logits = model(x[:, :-1])
    logits = logits if isinstance(logits, torch.Tensor) else logits.logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))


def train(model, loss_fn, steps: int = 6, lr: float = 1e-2) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    return losses


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: nf4.dequantize(p).detach().clone() for n, p in model.named_parameters()}


def moved(before: dict, model) -> set[str]:
    after = snapshot(model)
    return {n for n in after if not torch.equal(before[n], after[n])}


METHODS = {
    "full": dict(name="full"),
    "last_n": dict(name="last_n", last_n=1),
    "lora": dict(name="lora"),
    "dora": dict(name="dora"),
    "rslora": dict(name="lora", rslora=True),
    "qlora": dict(name="qlora", nf4_block=64),
}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", CASES)
def test_each_method_trains_exactly_its_parameters(family, method, folders):
    model = load_hf_model(folders[family])
    apply_method(model, MethodConfig(r=4, alpha=8, targets="all-linear", **METHODS[method]))
    x = ids()
    before = snapshot(model)
    losses = train(model, lambda: lm_loss(model, x))
    assert losses[-1] < losses[0] - 0.05, losses
    last = f"blocks.{model.config.n_layer - 1}."
    expected = {
        "full": set(before),
        "last_n": {n for n in before if n.startswith(last) or n.startswith("norm.")},
    }.get(method, {n for n in before if ".lora_" in n})
    assert moved(before, model) == expected
    if method in ("dora", "rslora"):
        adapter = next(iter(lora_layers(model).values())).adapters[0]
        assert adapter.dora == (method == "dora") and adapter.rslora == (method == "rslora")
    if method == "qlora":
        assert all(nf4.is_nf4(layer.weight) for layer in lora_layers(model).values())


@pytest.mark.parametrize("family", CASES)
def test_dora_rslora_adapter_and_its_training_step_equal_peft(family, folders):
    """peft's DoRA with rank-stabilised scaling on the transformers model and the same adapter in
    nanotune: equal logits, and after one SGD step each, equal adapters (read back from peft's
    saved step), so the gradients of A, B and the magnitude agree."""
    peft_model = get_peft_model(
        tf.AutoModelForCausalLM.from_pretrained(folders[family]),
        LoraConfig(
            r=4,
            lora_alpha=8,
            use_dora=True,
            use_rslora=True,
            target_modules=PEFT_TARGETS.get(family, LLAMA_TARGETS),
        ),
    )
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif "lora_magnitude" in n:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
    peft_model.eval()  # no dropout; the step is a plain gradient step either way
    with peft_model.disable_adapter():
        base_logits = peft_model(ids()).logits
    tmp = folders[family].parent
    peft_model.save_pretrained(str(tmp / f"{family}-dora-0"))
    ours = load_adapter(load_hf_model(folders[family]), tmp / f"{family}-dora-0").eval()
    for n, p in ours.named_parameters():
        p.requires_grad_(".lora_" in n)
    adapters = next(iter(lora_layers(ours).values())).adapters
    assert all(a.dora and a.rslora for a in adapters)
    x = ids()
    with torch.no_grad():
        ref = peft_model(x).logits
        assert (ours(x) - ref).abs().max() < 1e-4
        assert (ref - base_logits).abs().max() > 1e-2  # the adapter changes the output

    for model in (peft_model, ours):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.5)
        lm_loss(model, x).backward()
        opt.step()
    peft_model.save_pretrained(str(tmp / f"{family}-dora-1"))
    stepped = load_adapter(load_hf_model(folders[family]), tmp / f"{family}-dora-1").eval()
    with torch.no_grad():
        after = ours(x)
        assert (after - ref).abs().max() > 1e-3  # the step moved the model
        assert (stepped(x) - after).abs().max() < 1e-4


def pooled_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded rows of 20, 13, 7 and 1 tokens."""
    x = ids(seed=2)
    lengths = torch.tensor([T, 13, 7, 1])
    x[torch.arange(T)[None, :] >= lengths[:, None]] = 0
    return x, lengths


@pytest.mark.parametrize("family", CASES)
def test_a_classification_head_equals_transformers_and_trains_with_lora(family, folders):
    hf = tf.AutoModelForSequenceClassification.from_pretrained(
        folders[family], num_labels=3, pad_token_id=0
    ).eval()
    clf = SequenceClassifier(load_hf_model(folders[family]), 3)
    with torch.no_grad():
        clf.score.weight.copy_(hf.score.weight)
    x, lengths = pooled_batch()
    with torch.no_grad():
        ref = hf(input_ids=x, attention_mask=(x != 0).long()).logits
        assert (clf.eval()(x, lengths) - ref).abs().max() < 1e-4
    apply_method(clf, MethodConfig(name="lora", r=4, alpha=8, targets="all-linear"))
    labels = torch.tensor([0, 1, 2, 1])
    before = snapshot(clf)
    losses = train(clf.train(), lambda: F.cross_entropy(clf(x, lengths), labels), lr=3e-2)
    assert losses[-1] < losses[0] - 0.05, losses
    assert moved(before, clf) == {"score.weight"} | {n for n in before if ".lora_" in n}


def pairs(n: int = 6, seed: int = 0) -> list[PreferenceExample]:
    """Prompts of 9 to 13 tokens and responses of 3 to 9: prompt + response crosses the window."""
    g = torch.Generator().manual_seed(seed)

    def tokens(k: int) -> list[int]:
        return torch.randint(3, VOCAB, (k,), generator=g).tolist()

    return [
        PreferenceExample(tokens(9 + i % 5), tokens(3 + (5 * i) % 7), tokens(4 + (3 * i) % 6))
        for i in range(n)
    ]


@pytest.mark.parametrize("family", CASES)
def test_a_reward_model_learns_the_preference(family, folders):
    torch.manual_seed(4)
    model = SequenceClassifier(load_hf_model(folders[family]), 1, ["reward"])
    apply_method(model, MethodConfig(name="lora", r=4, alpha=8, targets="all-linear"))
    batch = collate_preference(pairs(), pad_id=0)
    objective = PreferenceObjective("reward")
    before = snapshot(model)
    losses = train(model.train(), lambda: objective.loss_sum(model, batch) / 6, lr=3e-2)
    assert losses[-1] < losses[0] - 0.05, losses
    assert moved(before, model) == {"score.weight"} | {n for n in before if ".lora_" in n}
    with torch.no_grad():
        _, chosen, rejected, _ = objective.pairs(model.eval(), batch)
    assert (chosen > rejected).all()


@pytest.mark.slow
@pytest.mark.parametrize("family", CASES)
def test_dpo_with_lora_starts_at_log2_and_learns(family, folders):
    """Pair rows (prompt once, chosen and rejected as branches) give each sequence's own
    log-probs, windows included; DPO against the adapters-off reference starts at log 2 per
    pair and falls."""
    model = load_hf_model(folders[family])
    batch = collate_preference(pairs(seed=1), pad_id=0)
    with torch.no_grad():
        got = response_logps(model, batch)[0]
        for b, ex in enumerate(pairs(seed=1)):
            for j, response in enumerate((ex.chosen, ex.rejected)):
                logp = torch.log_softmax(model(torch.tensor([ex.prompt + response]))[0], -1)
                p = len(ex.prompt)
                alone = logp[p - 1 : -1].gather(1, torch.tensor(response)[:, None]).sum()
                assert abs(got[b, j] - alone) < 1e-4, (b, j)
    frozen = copy.deepcopy(model)
    apply_method(model, MethodConfig(name="lora", r=4, alpha=8, targets="all-linear"))
    objective = PreferenceObjective("dpo", beta=0.5, reference=adapters_disabled)
    losses = train(model.train(), lambda: objective.loss_sum(model, batch) / 6, lr=3e-2)
    assert losses[0] == pytest.approx(0.6931472, abs=1e-5)  # the policy is the reference
    assert losses[-1] < losses[0] - 0.05, losses
    with torch.no_grad(), adapters_disabled(model):
        off = response_logps(model.eval(), batch)[0]
    assert (off - response_logps(frozen, batch)[0]).abs().max() < 1e-5
