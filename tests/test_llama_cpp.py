"""The real client: llama.cpp (through llama-cpp-python, an optional extra built from its PyPI
source package) loads nanotune's GGUF exports of a fine-tuned SmolLM2, merged and as base +
GGUF LoRA adapter, and decodes greedily the tokens nanotune does. Skipped without llama_cpp."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, LlamaFileType
from gguf.quants import dequantize

from nanotune.cli import main
from nanotune.generate import GenerationConfig, generate_ids
from nanotune.hardware import cpu_flags
from nanotune.jobs import artifacts
from nanotune.weights import load_model
from nanotune.weights.gguf import written_by_nanotune

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.llama_cpp

PROMPTS = ("Reverse the words: stone tiger piano", "What is 2+2?")
N = 32
# q8_0: llama.cpp's kernels quantize the activations to 8 bits as well (q8_0 x q8_0 dot products)
# where nanotune multiplies float32 activations by the dequantized weights, so the logits differ
# more (measured: first logits up to 1.25 apart at magnitudes ~33) and the greedy paths part
# after 19 tokens on the second prompt, long after its answer's end of turn: 16 tokens compared.
N_Q8 = 16
Q8_TOLERANCE = 2.0


def export(argv: list[str]) -> None:
    assert main(["export", *argv]) == 0


def llama(path, lora=None):
    kwargs = {"lora_path": str(lora)} if lora else {}
    # A float32 KV cache (GGML_TYPE_F32 = 0; llama.cpp's default is f16), so that llama.cpp
    # computes what nanotune does in float32 and the logits can be compared closely.
    f32 = {"type_k": 0, "type_v": 0}
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=256,
        n_threads=2,
        logits_all=True,
        verbose=False,
        **f32,
        **kwargs,
    )


def llama_greedy(model, prompt: list[int], n: int = N) -> tuple[list[int], torch.Tensor]:
    """n greedy tokens from llama.cpp's own logits (no sampler: argmax), and the first logits."""
    model.reset()
    model.eval(prompt)
    first = torch.tensor(model.scores[model.n_tokens - 1])
    out = []
    for _ in range(n):
        out.append(int(model.scores[model.n_tokens - 1].argmax()))
        model.eval([out[-1]])
    return out, first


@pytest.fixture(scope="module")
def exports(smollm2_lora_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("llama_cpp")
    base = "smollm2-135m-instruct"
    export(["--format", "gguf", "--quant", "f32", "--model", base, str(out / "base.gguf")])
    export(["--format", "gguf", "--quant", "f32", "--adapter", str(smollm2_lora_run),
            str(out / "merged.gguf")])  # fmt: skip
    export(["--format", "gguf-lora", "--adapter", str(smollm2_lora_run), str(out / "lora.gguf")])
    return out


@pytest.mark.real_model
def test_llama_cpp_decodes_the_merged_export_and_base_plus_gguf_lora_as_nanotune(
    smollm2_lora_run, exports
):
    tuned, tokenizer = artifacts.load(None, smollm2_lora_run)
    merged = llama(exports / "merged.gguf")
    adapted = llama(exports / "base.gguf", lora=exports / "lora.gguf")
    config = GenerationConfig(max_new_tokens=N, stop_token_ids=())
    for text in PROMPTS:
        chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], True)
        prompt = tokenizer.encode(chat)
        # llama.cpp reads the exported vocabulary and pre-tokenizer to the same ids.
        assert merged.tokenize(chat.encode(), add_bos=False, special=True) == prompt
        want = generate_ids(tuned, [prompt], config, tokenizer)[0]
        with torch.no_grad():
            ours = tuned(torch.tensor([prompt]))[0, -1]
        for model in (merged, adapted):
            got, first = llama_greedy(model, prompt)
            assert got == want, (text, tokenizer.decode(got), tokenizer.decode(want))
            # Measured <= 7.5e-5 on logits up to ~30 (0.019 with llama.cpp's f16 KV cache).
            assert (first - ours).abs().max() < 1e-3


@pytest.mark.real_model
def test_the_gguf_lora_changes_what_llama_cpp_decodes(exports, smollm2_lora_run):
    _, tokenizer = artifacts.load(None, smollm2_lora_run)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], True)
    prompt = tokenizer.encode(chat)
    base, _ = llama_greedy(llama(exports / "base.gguf"), prompt)
    adapted, _ = llama_greedy(llama(exports / "base.gguf", lora=exports / "lora.gguf"), prompt)
    assert base != adapted


def test_llama_cpp_is_built_without_ggml_amx_backend():
    """ggml's AMX backend crashes on the first token of every quantized GGUF on Intel CPUs with
    AMX (llama.cpp issue 20824): the Makefile builds llama-cpp-python with -mno-amx-*, and keeps
    the rest of -march=native (AVX2 where the CPU has it)."""
    info = llama_cpp.llama_print_system_info().decode()
    assert "CPU : " in info, info
    assert "AMX_INT8 = 1" not in info, info
    if "avx2" in cpu_flags():
        assert "AVX2 = 1" in info, info


@pytest.mark.real_model
def test_llama_cpp_decodes_the_q8_0_export_as_nanotune_decodes_the_same_file(
    smollm2_lora_run, tmp_path
):
    """The quantized route (the one ggml's AMX backend crashed on): the merged q8_0 export,
    decoded by llama.cpp in its q8_0 kernels and by nanotune from the same file (dequantized to
    float32), gives the same greedy tokens."""
    path = tmp_path / "merged.q8_0.gguf"
    export(["--format", "gguf", "--quant", "q8_0", "--adapter", str(smollm2_lora_run), str(path)])
    ours, tokenizer = artifacts.load(str(path))
    theirs = llama(path)
    config = GenerationConfig(max_new_tokens=N_Q8, stop_token_ids=())
    for text in PROMPTS:
        chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], True)
        prompt = tokenizer.encode(chat)
        assert theirs.tokenize(chat.encode(), add_bos=False, special=True) == prompt
        want = generate_ids(ours, [prompt], config, tokenizer)[0]
        with torch.no_grad():
            logits = ours(torch.tensor([prompt]))[0, -1]
        got, first = llama_greedy(theirs, prompt, N_Q8)
        assert got == want, (text, tokenizer.decode(got), tokenizer.decode(want))
        assert (first - logits).abs().max() < Q8_TOLERANCE


def test_a_q4_k_m_export_is_llama_cpps_k_quants_read_back_alike(tiny_llama_factory, tmp_path):
    """--quant q4_k_m: llama.cpp's quantizer types the matrices (hidden 256: whole K-quant
    super-blocks, so no fallback), the file keeps nanotune's mark, --ollama writes its Modelfile,
    no scratch file is left, and nanotune and llama.cpp compute alike from it."""
    folder = tiny_llama_factory(hidden_size=256, intermediate_size=512)
    out = tmp_path / "k.gguf"
    export(["--format", "gguf", "--quant", "q4_k_m", "--ollama", "--model", str(folder), str(out)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile", "k.gguf"]
    reader = GGUFReader(out)
    found = {t.name: t.tensor_type for t in reader.tensors}
    assert found["blk.0.attn_q.weight"] == found["blk.0.ffn_up.weight"] == T.Q4_K
    assert found["output.weight"] == T.Q6_K  # llama.cpp gives the head more bits
    assert found["blk.0.attn_norm.weight"] == T.F32
    assert written_by_nanotune(out)
    assert reader.fields["general.file_type"].contents() == LlamaFileType.MOSTLY_Q4_K_M
    # nanotune reads the Q4_K matrices as gguf's dequantizer does, the source's rounded to
    # q4_K's 4-bit super-blocks (measured: 7.2% relative error on these random weights).
    source, _ = load_model(folder)
    ours, _ = load_model(out)
    name = "blocks.0.attn.proj.weight"  # attn_output: not permuted, not fused
    stored = next(t for t in reader.tensors if t.name == "blk.0.attn_output.weight")
    assert torch.equal(
        ours.state_dict()[name], torch.tensor(dequantize(stored.data, stored.tensor_type))
    )
    rounded = ours.state_dict()[name] - source.state_dict()[name]
    assert 0 < rounded.norm() / source.state_dict()[name].norm() < 0.1
    ids = list(range(1, 20))
    with torch.no_grad():
        got = ours(torch.tensor([ids]))[0]
    theirs = llama(out)
    theirs.eval(ids)
    logits = torch.tensor(np.array(theirs.scores[: len(ids)]))
    # llama.cpp quantizes the activations to 8 bits for its K-quant products, nanotune
    # multiplies float32 ones: measured 0.48 apart at logit magnitudes up to 8.3.
    assert (logits - got).abs().max() < 1.0


def test_a_failing_quantizer_is_one_line_and_leaves_no_file(
    tiny_llama_factory, tmp_path, monkeypatch, capsys
):
    folder = tiny_llama_factory(hidden_size=256, intermediate_size=512)
    monkeypatch.setattr(llama_cpp, "llama_model_quantize", lambda *_: 1)
    capsys.readouterr()
    argv = ["export", "--format", "gguf", "--quant", "q6_k", "--model", str(folder)]
    assert main([*argv, str(tmp_path / "k.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "llama.cpp's quantizer failed to write MOSTLY_Q6_K" in err
    assert list(tmp_path.iterdir()) == []  # the f32 scratch file and the target both removed


@pytest.mark.real_model
def test_llama_cpp_decodes_the_smollm2_q4_k_m_export_as_nanotune_decodes_the_same_file(tmp_path):
    """SmolLM2's rows of 576 are no whole 256-value super-blocks, so llama.cpp falls back to
    q5_0 (q8_0 for the heads) there and uses Q4_K/Q6_K for ffn_down. Greedy paths part early:
    llama.cpp's K-quant products quantize the activations to 8 bits, nanotune multiplies float32
    activations by the dequantized weights (measured, first 16 greedy tokens: 11, 0 and 2 agree
    on these prompts; on "What is 2+2?" the first logits are 0.97 apart at magnitudes ~31).
    So both score the same sequence, the prompt and nanotune's 16 greedy tokens: measured, the
    logits at most 2.2 apart and llama.cpp's argmax equal to nanotune's at 15, 15 and 14 of 16."""
    path = tmp_path / "smollm2.q4_k_m.gguf"
    export(["--format", "gguf", "--quant", "q4_k_m", "--model", "smollm2-135m-instruct", str(path)])
    assert T.Q4_K in {t.tensor_type for t in GGUFReader(path).tensors}
    ours, tokenizer = artifacts.load(str(path))
    theirs = llama(path)
    config = GenerationConfig(max_new_tokens=N_Q8, stop_token_ids=())
    for text in (*PROMPTS, "Write a haiku about the sea."):
        chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], True)
        prompt = tokenizer.encode(chat)
        assert theirs.tokenize(chat.encode(), add_bos=False, special=True) == prompt
        seq = prompt + generate_ids(ours, [prompt], config, tokenizer)[0]
        with torch.no_grad():
            want = ours(torch.tensor([seq]))[0, len(prompt) - 1 : -1]
        theirs.reset()
        theirs.eval(seq)
        got = torch.tensor(np.array(theirs.scores[len(prompt) - 1 : len(seq) - 1]))
        assert (got - want).abs().max() < 3.0, text
        assert (got.argmax(-1) == want.argmax(-1)).sum() >= 13, text
