"""The Llama-derived families (Qwen2/2.5, Qwen3, Mistral, SmolLM3, Gemma 2 and 3, Phi-3) and
GPT-NeoX (Pythia) through the one decoder: tiny random models built with transformers' own classes
load with equal logits, decode the same greedy tokens (past a sliding window of 8 where the family
has one), train with equal gradients, trade LoRA adapters with peft both ways, merge to a folder
transformers loads, and export GGUF that llama.cpp decodes as nanotune does."""

from __future__ import annotations

import shutil
import threading
import warnings

import pytest
import torch
import transformers as tf
from conftest import TINY_INIT
from peft import LoraConfig, PeftModel, get_peft_model

from nanotune.errors import NanotuneError
from nanotune.generate import GenerationConfig, generate_ids
from nanotune.methods import MethodConfig, apply_method, lora_layers
from nanotune.methods.lora import resolve_targets
from nanotune.models import PRESETS, ModelConfig, Transformer
from nanotune.models.transformer import longrope
from nanotune.weights import convert, load_model
from nanotune.weights.gguf import load_gguf_model, open_gguf
from nanotune.weights.gguf_export import export_gguf
from nanotune.weights.hf import load_hf_model, read_config
from nanotune.weights.peft import load_adapter, save_adapter

warnings.filterwarnings("ignore")
pytestmark = pytest.mark.usefixtures("one_thread")

WINDOW = 8
COMMON = dict(
    vocab_size=49152,  # SmolLM2's tokenizer, so the folders and GGUF files carry a real one
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,  # SmolLM3's fourth layer is its one without RoPE
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    initializer_range=TINY_INIT,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=None,
)
GEMMA = dict(
    head_dim=16,
    query_pre_attn_scalar=16,
    sliding_window=WINDOW,
    tie_word_embeddings=True,
    hidden_activation="gelu_pytorch_tanh",
)
# case -> (config class, model class, config overrides, nanotune family)
FAMILIES = {
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}, "qwen2"),
    # Released Qwen2.5 configs have use_sliding_window false; honoured when true, on the layers
    # from max_window_layers on.
    "qwen2-window": (
        tf.Qwen2Config,
        tf.Qwen2ForCausalLM,
        dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2),
        "qwen2",
    ),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(head_dim=16), "qwen3"),  # 16 != 32/4
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(sliding_window=WINDOW), "mistral"),
    # Mistral 7B v0.2 and later ship no window.
    "mistral-v0.3": (tf.MistralConfig, tf.MistralForCausalLM, dict(sliding_window=None), "mistral"),
    "smollm3": (tf.SmolLM3Config, tf.SmolLM3ForCausalLM, dict(tie_word_embeddings=True), "smollm3"),
    # Gemma: head_dim apart from hidden/heads, tied head, queries scaled by head_dim as llama.cpp
    # does; Gemma 2's local and global layers alternate, with soft-caps small enough to bite
    # (logits here are ~1); Gemma 3 slides on five layers of six, its local RoPE base its own.
    "gemma2": (
        tf.Gemma2Config,
        tf.Gemma2ForCausalLM,
        dict(GEMMA, attn_logit_softcapping=0.5, final_logit_softcapping=0.5),
        "gemma2",
    ),
    "gemma3": (
        tf.Gemma3TextConfig,
        tf.Gemma3ForCausalLM,
        dict(GEMMA, num_hidden_layers=6, rope_theta=50000.0, rope_local_base_freq=10000.0),
        "gemma3",
    ),
}
# Phi-3: fused qkv_proj/gate_up_proj; rotary on half of each head (as Phi-4-mini on 3/4); longrope
# (Phi-3.5-mini, the 128k Phi-3s) with an original context of 16, so the 20-token prompt turns by
# the long factors and the 13-token one switches to them while decoding, and Phi-3-mini-4k's window.
PHI3_LONGROPE = dict(
    original_max_position_embeddings=16,
    sliding_window=WINDOW,
    rope_scaling=dict(
        rope_type="longrope", short_factor=[1.0, 1.2, 1.5, 2.0], long_factor=[2.0, 4.0, 8.0, 16.0]
    ),
)
FAMILIES |= {
    "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, dict(partial_rotary_factor=0.5), "phi3"),
    "phi3-longrope": (tf.Phi3Config, tf.Phi3ForCausalLM, PHI3_LONGROPE, "phi3"),
    # Pythia: parallel residual, rotary on half of each head (Pythia: a quarter of 64), biases.
    "gpt_neox": (
        tf.GPTNeoXConfig,
        tf.GPTNeoXForCausalLM,
        dict(rotary_pct=0.5, use_parallel_residual=True, layer_norm_eps=1e-5),
        "gpt_neox",
    ),
}
CASES = list(FAMILIES)
# Prompts longer than the window (20 and 13 tokens), decoded to 32 more.
PROMPTS = [
    torch.randint(3, 49152, (20,), generator=torch.Generator().manual_seed(1)).tolist(),
    torch.randint(3, 49152, (13,), generator=torch.Generator().manual_seed(2)).tolist(),
]
N = 32


def hf_model(case: str, seed: int = 0):
    config_cls, model_cls, overrides, _ = FAMILIES[case]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**COMMON, **overrides})).eval()
    if FAMILIES[case][3].startswith("gemma"):  # its norms start at 0 (x * (1 + 0)): unmask them
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(0, 0.3)
    if FAMILIES[case][3] == "gpt_neox":  # biases and LayerNorm shifts start at 0: make them count
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.3)
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory, smollm2_tokenizer_dir):
    """case -> an HF folder saved by transformers (+ SmolLM2's tokenizer files)."""
    out = {}
    for case in CASES:
        d = tmp_path_factory.mktemp(case)
        hf_model(case).save_pretrained(d)
        for f in smollm2_tokenizer_dir.iterdir():
            shutil.copy2(f, d / f.name)
        out[case] = d
    return out


@pytest.fixture(scope="module")
def ggufs(folders, tmp_path_factory):
    """case -> (model, {quant: its GGUF export}), each written once for the module."""
    made = {}

    def get(case: str):
        if case not in made:
            model, tokenizer = load_model(folders[case])
            out = tmp_path_factory.mktemp(f"gguf-{case}")
            paths = {q: export_gguf(model, tokenizer, out / f"{q}.gguf", quant=q) for q in QUANTS}
            made[case] = model, paths
        return made[case]

    return get


QUANTS = ("f32", "q8_0")


def hf_greedy(model, prompt: list[int], n: int = N) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


def greedy(model: Transformer, prompts, n: int = N) -> list[list[int]]:
    return generate_ids(model, prompts, GenerationConfig(max_new_tokens=n, stop_token_ids=()))


@pytest.mark.parametrize("case", CASES)
def test_config_reads_the_family_flags(case, folders):
    config = read_config(folders[case])
    assert config.family == FAMILIES[case][3]
    assert config.qkv_bias == (config.family == "qwen2")
    assert config.attn_bias == config.parallel_residual == (config.family == "gpt_neox")
    assert config.partial_rotary_factor == (0.5 if case in ("phi3", "gpt_neox") else 1.0)
    assert (config.rope_scaling or {}).get("rope_type") == (
        "longrope" if case == "phi3-longrope" else None
    )
    assert config.qk_norm == (config.family in ("qwen3", "gemma3"))
    assert config.hd == (16 if case in ("qwen3", "gemma2", "gemma3") else 8)
    assert config.nope_layers == ((3,) if case == "smollm3" else ())
    gemma = config.family.startswith("gemma")
    assert config.norm_plus_one == config.post_norms == config.embed_scale == gemma
    assert config.mlp == ("geglu" if gemma else "gelu_exact" if case == "gpt_neox" else "swiglu")
    assert config.attn_softcap == config.final_softcap == (0.5 if case == "gemma2" else None)
    assert config.rope_local_theta == (10000.0 if case == "gemma3" else None)
    windows = [config.window(i) for i in range(config.n_layer)]
    W, G = WINDOW, None
    expected = {
        "mistral": [W] * 4,
        "phi3-longrope": [W] * 4,
        "qwen2-window": [G, G, W, W],
        "gemma2": [W, G, W, G],
        "gemma3": [W, W, W, W, W, G],
    }
    assert windows == expected.get(case, [None] * 4)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_logits_and_greedy_tokens_equal_transformers(case, folders):
    hf = tf.AutoModelForCausalLM.from_pretrained(folders[case]).eval()
    ours = load_hf_model(folders[case])
    ids = torch.tensor([PROMPTS[0], PROMPTS[0][::-1]])
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() < 1e-4
    # Batched: the shorter prompt is left-padded, so the window counts real tokens only.
    ref = [hf_greedy(hf, p) for p in PROMPTS]
    assert greedy(ours, PROMPTS) == ref
    assert greedy(ours, PROMPTS[:1]) == ref[:1]  # alone: no padding, plain KV-cache decoding


def test_the_window_changes_what_mistral_computes(folders):
    """A test that cannot fail is a defect: without its window the same weights decode
    otherwise, so the window really bounds attention in the parity above."""
    model = load_hf_model(folders["mistral"])
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        windowed = model(ids)
        model_full = load_hf_model(folders["mistral"])
        for block in model_full.blocks:
            block.attn.window = None
        model_full.config = model_full.config.with_(sliding_window=None)
        full = model_full(ids)
    assert (windowed[:, :WINDOW] - full[:, :WINDOW]).abs().max() < 1e-5  # inside the window
    assert (windowed[:, WINDOW:] - full[:, WINDOW:]).abs().max() > 1e-2  # past it


@pytest.mark.parametrize(
    "case, changes",
    [
        ("phi3", dict(partial_rotary_factor=1.0)),
        ("phi3-longrope", dict(rope_scaling=None)),
        ("gpt_neox", dict(parallel_residual=False)),
        ("gpt_neox", dict(partial_rotary_factor=0.25)),
        ("gpt_neox", dict(mlp="gelu")),
        ("gemma2", dict(attn_softcap=None)),
        ("gemma2", dict(final_softcap=None)),
        ("gemma2", dict(query_pre_attn_scalar=64)),
        ("gemma3", dict(rope_local_theta=None)),
        ("gemma3", dict(sliding_window=None, window_layers=None)),
    ],
)
def test_each_flag_changes_what_is_computed(case, changes, folders):
    """The parity above means something: without each flag the same weights compute otherwise."""
    model = load_hf_model(folders[case])
    other = Transformer(model.config.with_(**changes))
    other.load_state_dict(model.state_dict())
    ids = torch.tensor([PROMPTS[0]])
    # GELU's two forms differ by ~1e-3 at most, so its bar is lower.
    bar = 1e-4 if changes.get("mlp") == "gelu" else 1e-2
    assert (_logits(other.eval(), ids) - _logits(model, ids)).abs().max() > bar


def test_a_sequential_gpt_neox_equals_transformers(tmp_path):
    """use_parallel_residual false (some GPT-NeoX checkpoints): the MLP reads x + attention."""
    torch.manual_seed(0)
    config = tf.GPTNeoXConfig(
        **{**COMMON, **FAMILIES["gpt_neox"][2], "use_parallel_residual": False}
    )
    tf.GPTNeoXForCausalLM(config).save_pretrained(tmp_path)
    hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ours = load_hf_model(tmp_path)
    assert not ours.config.parallel_residual
    ids = torch.tensor([PROMPTS[0]])
    assert (_logits(ours, ids) - _logits(hf, ids)).abs().max() < 1e-4


def test_longrope_turns_a_row_by_its_own_length():
    """Rows batched together turn as each does alone: the 20-token row by the long factors, the
    left-padded 13-token one by the short (transformers picks one set for the whole batch)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**_phi3_tiny())).eval()
    with torch.no_grad():  # weights of the tiny models' scale, so positions move the logits
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, TINY_INIT)
    short = torch.tensor([PROMPTS[1]])
    batch = torch.zeros(2, 20, dtype=torch.long)
    batch[0], batch[1, 7:] = torch.tensor(PROMPTS[0]), short[0]
    mask = (torch.arange(20) >= torch.tensor([[0], [7]])).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        together = model(batch, positions=positions, attention_mask=mask)
        alone = model(short)
        long = model(torch.tensor([PROMPTS[0]]))
        # The same model with an original context of 4: the 13 tokens turn by the long factors.
        scaling = {**model.config.rope_scaling, "original_max_position_embeddings": 4}
        scaling["attention_factor"] = model.longrope[1]
        turned_long = Transformer(model.config.with_(rope_scaling=scaling))
        turned_long.load_state_dict(model.state_dict())
        other = turned_long.eval()(short)
    assert (together[1, 7:] - alone[0]).abs().max() < 1e-5
    assert (together[0] - long[0]).abs().max() < 1e-5
    assert (alone - other).abs().max() > 1e-2


def _phi3_tiny() -> dict:
    return dict(
        family="phi3",
        vocab_size=49152,
        block_size=128,
        n_layer=2,
        n_head=4,
        n_embd=32,
        intermediate_size=64,
        norm="rmsnorm",
        positions="rope",
        mlp="swiglu",
        attn_bias=False,
        mlp_bias=False,
        rope_scaling={**PHI3_LONGROPE["rope_scaling"], "original_max_position_embeddings": 16},
    )


def test_the_output_soft_cap_survives_int8_decoding(folders):
    """Gemma 2's final soft-cap is a hook on lm_head; the decoding layers that replace the head
    keep it."""
    from nanotune.models.linear import quantize_int8

    model = quantize_int8(load_hf_model(folders["gemma2"]))
    assert type(model.lm_head).__name__ == "Int8Linear"
    logits = _logits(model, torch.tensor([PROMPTS[0]]))
    assert logits.abs().max() <= 0.5 + 1e-3  # within final_logit_softcapping


@pytest.mark.parametrize("case", ["mistral", "qwen2-window"])
def test_packed_documents_each_see_their_own_window(case, folders):
    """Two documents packed in one row (positions restart, doc ids apart) give the logits each
    gives alone in transformers."""
    hf = tf.AutoModelForCausalLM.from_pretrained(folders[case]).eval()
    ours = load_hf_model(folders[case])
    a, b = PROMPTS
    ids = torch.tensor([a + b])
    positions = torch.tensor([list(range(len(a))) + list(range(len(b)))])
    doc_ids = torch.tensor([[0] * len(a) + [1] * len(b)])
    with torch.no_grad():
        packed = ours(ids, positions=positions, doc_ids=doc_ids)[0]
        alone = torch.cat([hf(torch.tensor([p])).logits[0] for p in PROMPTS])
    assert (packed - alone).abs().max() < 1e-4


@pytest.mark.parametrize("case", ["mistral", "phi3-longrope", "gpt_neox"])
def test_a_classifier_reads_the_last_real_token_through_the_window(case, folders):
    """SequenceClassifier's pooled path (only the last token's query in the last block) on
    right-padded rows equals transformers' *ForSequenceClassification (Mistral's window,
    GPT-NeoX's parallel residual on the one pooled position)."""
    from nanotune.methods import SequenceClassifier

    hf = tf.AutoModelForSequenceClassification.from_pretrained(
        folders[case], num_labels=3, pad_token_id=0
    ).eval()
    clf = SequenceClassifier(load_hf_model(folders[case]), 3)
    with torch.no_grad():
        clf.score.weight.copy_(hf.score.weight)
    lengths = torch.tensor([len(p) for p in PROMPTS])
    ids = torch.zeros(2, int(lengths.max()), dtype=torch.long)
    for row, p in enumerate(PROMPTS):
        ids[row, : len(p)] = torch.tensor(p)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=(ids != 0).long()).logits
        assert (clf.eval()(ids, lengths) - ref).abs().max() < 1e-4


# The one tensor whose file name is not its module's: GPT-NeoX's head, saved as `embed_out`.
SAVED_AS = {"embed_out.weight": "lm_head.weight"}


@pytest.mark.parametrize("case", CASES)
def test_training_gradients_equal_transformers(case, folders):
    hf = tf.AutoModelForCausalLM.from_pretrained(folders[case]).train()
    ours = load_hf_model(folders[case]).train()
    ids = torch.tensor([PROMPTS[0], PROMPTS[0][::-1]])
    hf(ids, labels=ids).loss.backward()
    logits = ours(ids)
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
    )
    loss.backward()
    grads = {n: p.grad for n, p in ours.named_parameters()}
    if ours.config.tie_embeddings:
        grads["lm_head.weight"] = grads["wte.weight"]
    ref = dict(hf.named_parameters())
    for name, g in convert.to_hf(grads, ours.config).items():
        want = ref[SAVED_AS.get(name, name)].grad
        rel = (g - want).abs().max() / want.abs().max()
        assert rel < 1e-4, (name, rel.item())


def randomise(model, seed: int = 7) -> None:
    """LoRA's B starts at zero: perturb it so parity means something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


LLAMA = ["q_proj", "k_proj", "o_proj", "up_proj"]
# Each family's own module names (Phi-3 and GPT-NeoX fuse q/k/v, and Phi-3 gate/up).
PEFT_TARGETS = {
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h"],
}


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_lora_adapters_travel_both_ways_with_peft_and_merge_for_transformers(
    case, folders, tmp_path
):
    from nanotune.cli import main

    ids = torch.tensor([PROMPTS[0]])
    # nanotune's adapter (every linear) loads in peft on the transformers model.
    ours = load_hf_model(folders[case])
    apply_method(ours, MethodConfig(name="lora", r=4, alpha=8, targets="all-linear"))
    assert len(lora_layers(ours)) == 4 * ours.config.n_layer  # qkv, o, gate/up, down per block
    randomise(ours)
    ours.eval()
    adapted = _logits(ours, ids)
    save_adapter(ours, tmp_path / "ours", base_model=str(folders[case]))
    base = tf.AutoModelForCausalLM.from_pretrained(folders[case]).eval()
    assert (_logits(base, ids) - adapted).abs().max() > 1e-2  # the adapter changes the output
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "ours")).eval()
    assert (_logits(peft_model, ids) - adapted).abs().max() < 1e-4

    # peft's adapter loads into nanotune.
    made = get_peft_model(
        tf.AutoModelForCausalLM.from_pretrained(folders[case]),
        LoraConfig(r=4, lora_alpha=8, target_modules=PEFT_TARGETS.get(FAMILIES[case][3], LLAMA)),
    )
    randomise(made, seed=3)
    made.eval()
    ref = _logits(made, ids)
    made.save_pretrained(str(tmp_path / "peft"))
    fresh = load_hf_model(folders[case])
    load_adapter(fresh, tmp_path / "peft")
    assert (_logits(fresh.eval(), ids) - ref).abs().max() < 1e-4

    # nanotune merge: a folder transformers loads with the adapted logits.
    argv = ["merge", "--model", str(folders[case]), "--adapter", str(tmp_path / "ours")]
    assert main([*argv, str(tmp_path / "merged")]) == 0
    merged = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert type(merged).__name__ == type(base).__name__
    assert (_logits(merged, ids) - adapted).abs().max() < 1e-4


@pytest.mark.parametrize(
    "case, targets",
    [
        ("gpt_neox", ["query_key_value.q", "query_key_value.v", "dense_h_to_4h"]),
        ("phi3", ["qkv_proj.k", "gate_up_proj.up", "o_proj"]),
    ],
)
def test_dora_and_slice_pairs_on_fused_modules_travel_with_peft(case, targets, folders, tmp_path):
    """What the fused modules make harder: nanotune's separate pairs on the q/k/v (gate/up)
    slices go out as one block-structured PEFT pair, GPT-NeoX's B rows and DoRA magnitudes in its
    per-head order; and a PEFT DoRA adapter on the fused modules loads back exactly."""
    ids = torch.tensor([PROMPTS[0]])
    ours = load_hf_model(folders[case])
    apply_method(ours, MethodConfig(name="dora", r=4, alpha=8, targets=targets))
    randomise(ours)
    with torch.no_grad():  # magnitudes off the weight norms, so DoRA is more than LoRA
        for n, p in ours.named_parameters():
            if "lora_magnitude" in n:
                p.mul_(1.5)
    adapted = _logits(ours.eval(), ids)
    save_adapter(ours, tmp_path / "ours", base_model=str(folders[case]))
    base = tf.AutoModelForCausalLM.from_pretrained(folders[case]).eval()
    assert (_logits(base, ids) - adapted).abs().max() > 1e-2
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "ours")).eval()
    assert (_logits(peft_model, ids) - adapted).abs().max() < 1e-4

    made = get_peft_model(
        tf.AutoModelForCausalLM.from_pretrained(folders[case]),
        LoraConfig(r=4, lora_alpha=8, target_modules=PEFT_TARGETS[case], use_dora=True),
    )
    randomise(made, seed=3)
    with torch.no_grad():
        for n, p in made.named_parameters():
            if "lora_magnitude" in n:
                p.mul_(1.5)
    made.eval()
    ref = _logits(made, ids)
    made.save_pretrained(str(tmp_path / "peft"))
    fresh = load_hf_model(folders[case])
    load_adapter(fresh, tmp_path / "peft")
    assert (_logits(fresh.eval(), ids) - ref).abs().max() < 1e-4


def flags(config) -> tuple:
    """What selects the layers (the config a GGUF reads back may spell defaults otherwise)."""
    return (
        config.family,
        config.hd,
        config.kv_heads,
        config.has_qkv_bias,
        config.attn_bias,
        config.qk_norm,
        config.tie_embeddings,
        config.nope_layers,
        [config.window(i) for i in range(config.n_layer)],
        round(config.norm_eps, 9),
        config.rope_theta,
        config.rope_local_theta,
        config.mlp,
        (config.norm_plus_one, config.post_norms, config.embed_scale),
        config.query_pre_attn_scalar,
        config.attn_softcap,
        config.final_softcap,
        config.partial_rotary_factor,
        config.parallel_residual,
        _longrope(config),
    )


def _longrope(config) -> tuple | None:
    """Longrope as it computes (a GGUF holds the factors as float32, the attention factor
    written out)."""
    long = longrope(config)
    if long is None:
        return None
    factors = [config.rope_scaling[k] for k in ("short_factor", "long_factor")]
    return long[0], round(long[1], 6), [[round(f, 6) for f in fs] for fs in factors]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["qwen3", "mistral", "phi3-longrope", "gpt_neox"])
def test_a_lora_runs_final_folder_loads_with_auto_peft(case, folders, tmp_path):
    """A real (short) fine-tune of the family, as a user runs it: its final/ is a PEFT folder
    that AutoPeftModelForCausalLM loads by the base's path, with nanotune's logits."""
    from peft import AutoPeftModelForCausalLM

    from nanotune.config import RunConfig
    from nanotune.jobs import artifacts
    from nanotune.jobs.finetune import train

    config = RunConfig.from_dict(
        {
            "model": {"name": str(folders[case])},
            "method": {"name": "lora", "r": 4, "alpha": 8, "targets": "all-linear"},
            "data": {"source": "builtin:reverse_words", "format": "chat", "limit": 16},
            "train": {"max_steps": 2, "micro_batch_size": 8, "lr": 1e-2, "seed": 0},
            "output_dir": str(tmp_path / "run"),
        }
    )
    final = train(config, progress=False).final_dir
    tuned, _ = artifacts.load(None, final)
    hf = AutoPeftModelForCausalLM.from_pretrained(str(final)).eval()
    ids = torch.tensor([PROMPTS[0]])
    base = tf.AutoModelForCausalLM.from_pretrained(folders[case]).eval()
    assert (_logits(base, ids) - _logits(tuned, ids)).abs().max() > 1e-3  # it trained
    assert (_logits(hf, ids) - _logits(tuned, ids)).abs().max() < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_gguf_export_reads_back_to_the_same_model(case, ggufs):
    model, paths = ggufs(case)
    ids = torch.tensor([PROMPTS[0]])
    path = paths["f32"]
    arch = {"mistral": "llama", "gpt_neox": "gptneox"}.get(model.config.family, model.config.family)
    assert open_gguf(path).fields["general.architecture"].contents() == arch
    back = load_gguf_model(path)
    # Read back, a Llama GGUF with a window is Mistral; without one it is (exactly) a Llama.
    assert back.config.family == ("llama" if case == "mistral-v0.3" else model.config.family)
    assert flags(back.config)[1:] == flags(model.config)[1:]
    assert (_logits(back, ids) - _logits(model, ids)).abs().max() < 1e-5
    q8 = load_gguf_model(paths["q8_0"])
    assert flags(q8.config)[1:] == flags(model.config)[1:]
    # Rows of one block; Gemma 3's six blocks (scaled embeddings, norms after each sublayer) add
    # up more of the rounding (measured 0.29).
    tolerance = 0.4 if case == "gemma3" else 0.25
    assert (_logits(q8, ids) - _logits(model, ids)).abs().max() < tolerance


# transformers' GGUF loader reads qwen2, llama, gemma2 and gemma3; its qwen3 mapping ignores
# key_length (head_dim 128 assumed: right for the released Qwen3, not for this tiny one) and it has
# no smollm3; it applies no window (as llama.cpp).
# Its gemma2/gemma3 mappings read no soft-caps and no query scale (the released models' defaults
# are assumed: caps 50 and 30, query_pre_attn_scalar 256), so these tiny ones pass their own.
GGUF_UNREAD = {
    "gemma2": dict(
        query_pre_attn_scalar=16, attn_logit_softcapping=0.5, final_logit_softcapping=0.5
    ),
    "gemma3": dict(query_pre_attn_scalar=16),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", ["qwen2", "mistral-v0.3", "gemma2", "gemma3", "phi3"])
def test_transformers_reads_the_gguf_export(case, ggufs):
    model, paths = ggufs(case)
    path = paths["f32"]
    config = tf.AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    for key, value in GGUF_UNREAD.get(case, {}).items():
        setattr(config, key, value)
    if case == "phi3":  # its phi3 mapping skips rope.dimension_count
        config.rope_parameters["partial_rotary_factor"] = 0.5
    hf = tf.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, config=config
    ).eval()
    ids = torch.tensor([PROMPTS[0]])
    assert (_logits(hf, ids) - _logits(model, ids)).abs().max() < 1e-4


def test_unknown_model_types_are_refused_naming_the_families():
    with pytest.raises(NanotuneError, match="'qwen2', 'qwen3', 'mistral', 'smollm3'"):
        convert.config_from_hf({"model_type": "mamba"})


# Published sizes (parameters, tied embeddings counted once), from the model cards.
PRESET_SIZES = {
    "qwen2.5-0.5b-instruct": 0.49e9,
    "qwen3-0.6b": 0.6e9,
    "smollm3-3b": 3.08e9,
    "mistral-7b-instruct-v0.3": 7.25e9,
    "gemma-3-270m": 0.268e9,
    "gemma-3-270m-it": 0.268e9,
    "gemma-3-1b-it": 1.0e9,
    "gemma-2-2b": 2.61e9,
    "gemma-2-2b-it": 2.61e9,
    "phi-3-mini-4k-instruct": 3.82e9,
    "phi-3.5-mini-instruct": 3.82e9,
    "pythia-160m": 162_322_944,  # the safetensors' count (the name rounds the same)
    "pythia-410m": 405_334_016,
}
ALL_LINEAR = {
    "phi3": {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"},
    "gpt_neox": {
        "attention.query_key_value",
        "attention.dense",
        "mlp.dense_h_to_4h",
        "mlp.dense_4h_to_h",
    },
}


@pytest.mark.parametrize("name", list(PRESET_SIZES))
def test_presets_have_the_published_shapes_and_lora_targets(name, capsys):
    from nanotune.cli import main

    config = PRESETS[name].config
    with torch.device("meta"):
        model = Transformer(config)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - PRESET_SIZES[name]) / PRESET_SIZES[name] < 0.01, n
    names = {hf for _, _, hf in resolve_targets(config, "all-linear")}
    assert names == ALL_LINEAR.get(config.family) or names == {
        f"{m}_proj" for m in ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o")
    } | {f"mlp.{m}_proj" for m in ("gate", "up", "down")}
    assert main(["models"]) == 0
    assert name in capsys.readouterr().out


@pytest.fixture
def mistral_engine(folders):
    from nanotune.decoding.engine import Engine

    model, tok = load_model(folders["mistral"])
    engine = Engine(model, tok, max_batch=4)
    engine.start()
    yield engine, tok
    engine.stop(timeout=30)


@pytest.mark.slow
def test_serve_engine_decodes_past_the_window_as_transformers(mistral_engine, folders):
    """The engine's decode rows sit at their own positions in the slot cache; its masks need no
    change for the window (the decoder counts distances by position)."""
    from nanotune.decoding.engine import BASE, Sampling, Sequence

    engine, tok = mistral_engine
    hf = tf.AutoModelForCausalLM.from_pretrained(folders["mistral"]).eval()
    sampling = Sampling(max_tokens=N, temperature=0.0, stop_token_ids=())
    outputs = [[] for _ in PROMPTS]
    done = [threading.Event() for _ in PROMPTS]

    def sink(i):
        def take(event):
            if event.token is not None:
                outputs[i].append(event.token)
            if event.finish_reason is not None:
                done[i].set()

        return take

    engine.submit([Sequence(p, BASE, sampling, tok, sink(i)) for i, p in enumerate(PROMPTS)])
    assert all(d.wait(60) for d in done)
    assert outputs == [hf_greedy(hf, p) for p in PROMPTS]


# llama.cpp (this build) applies no sliding window for the llama, qwen2 and phi3 architectures, as
# for the Mistral its own convert_hf_to_gguf writes: the window is in the metadata, unused there.
# It also picks Phi-3's long or short factors once, by the context it is given (128 here, past the
# tiny longrope's 16), where transformers and nanotune pick them by the positions in a forward.
LLAMA_CPP_CASES = [c for c in CASES if c not in ("mistral", "qwen2-window", "phi3-longrope")]
# q8_0: llama.cpp quantizes the activations to 8 bits too, where nanotune multiplies float32
# activations by the dequantized weights; on these random models (near-even next-token odds) the
# greedy paths part (after 1 to 13 tokens, measured), so the logits are compared along
# llama.cpp's path instead: within Q8_TOLERANCE of nanotune's on the same file (measured <= 0.04).
Q8_TOLERANCE = 0.1
# f32: llama.cpp's logits within 1e-4 of nanotune's, except through GELU (Gemma's GeGLU, GPT-NeoX's
# MLP): ggml's CPU GELU looks its values up in a float16 table (GGML_GELU_FP16), ~1e-3 off
# tanh-GELU (measured <= 1.5e-3), and GPT-NeoX's is the exact (erf) one, where ggml's gptneox
# computes the tanh one (measured <= 9e-4); the greedy tokens are still equal.
F32_TOLERANCE = {"gemma2": 5e-3, "gemma3": 5e-3, "gpt_neox": 5e-3}
# q8_0 through Gemma 3's six blocks (the read-back above: 0.29 against the float model): measured
# 0.10 against nanotune on the same file.
Q8_TOLERANCES = {"gemma3": 0.2}


def llama_cpp_greedy(path, prompt: list[int], n: int, lora=None) -> tuple[list[int], torch.Tensor]:
    """n greedy tokens from llama.cpp's own logits (argmax), and the logits [n, V] that chose
    each."""
    llama_cpp = pytest.importorskip("llama_cpp")
    kwargs = {"lora_path": str(lora)} if lora else {}
    model = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=128,
        n_threads=1,
        logits_all=True,
        verbose=False,
        type_k=0,  # a float32 KV cache, as nanotune's
        type_v=0,
        **kwargs,
    )
    model.eval(prompt)
    out, scores = [], []
    for _ in range(n):
        scores.append(torch.tensor(model.scores[model.n_tokens - 1]))
        out.append(int(scores[-1].argmax()))
        model.eval([out[-1]])
    model.close()
    return out, torch.stack(scores)


def along(model: Transformer, prompt: list[int], path: list[int]) -> torch.Tensor:
    """nanotune's logits [len(path), V] that pick each token of `path` after `prompt`."""
    ids = torch.tensor([prompt + path[:-1]])
    return _logits(model, ids)[0, len(prompt) - 1 :]


@pytest.mark.llama_cpp
@pytest.mark.parametrize("case", LLAMA_CPP_CASES)
def test_llama_cpp_decodes_the_gguf_exports_as_nanotune(case, folders, ggufs, tmp_path):
    from nanotune.weights.gguf_lora import export_gguf_lora

    model, paths = ggufs(case)
    f32, q8_path = paths["f32"], paths["q8_0"]
    model = load_hf_model(folders[case])  # its own copy: LoRA is applied to it below
    q8 = load_gguf_model(q8_path)  # what nanotune decodes from the same quantized file
    for prompt, want in zip(PROMPTS, greedy(model, PROMPTS), strict=True):
        out, scores = llama_cpp_greedy(f32, prompt, N)
        assert out == want
        assert (scores - along(model, prompt, out)).abs().max() < F32_TOLERANCE.get(case, 1e-4)
        out, scores = llama_cpp_greedy(q8_path, prompt, N)
        assert (scores - along(q8, prompt, out)).abs().max() < Q8_TOLERANCES.get(case, Q8_TOLERANCE)
    # The base's GGUF plus a GGUF LoRA adapter decodes as nanotune with the adapter.
    apply_method(model, MethodConfig(name="lora", r=4, alpha=8, targets="all-linear"))
    randomise(model)
    model.eval()
    save_adapter(model, tmp_path / "adapter", base_model=str(folders[case]))
    base, _ = load_model(folders[case])
    lora = export_gguf_lora(base, tmp_path / "adapter", tmp_path / "lora.gguf")
    prompt = PROMPTS[0]
    out, scores = llama_cpp_greedy(f32, prompt, N, lora=lora)
    assert out == greedy(model, [prompt])[0]
    assert (scores - along(model, prompt, out)).abs().max() < F32_TOLERANCE.get(case, 1e-4)
