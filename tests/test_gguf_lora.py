"""`nanotune export --format gguf-lora`: a LoRA adapter as llama.cpp's GGUF LoRA file. Applied to
the exported base GGUF the way llama.cpp applies it (W + alpha / r * B @ A, r the pair's rank),
it gives the merged export's weights; bad requests are one line and write nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from gguf.quants import dequantize

from nanotune.cli import main
from nanotune.errors import NanotuneError
from nanotune.methods import MethodConfig, apply_method
from nanotune.weights import load_model
from nanotune.weights.peft import save_adapter


def trained_adapter(base_dir, out, **method) -> None:
    """A LoRA adapter on the model in `base_dir`, with B perturbed (it starts at zero)."""
    model, tokenizer = load_model(base_dir)
    apply_method(model, MethodConfig(name="lora", r=4, alpha=8, **method))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    save_adapter(model, out, base_model=str(base_dir))


def export(*argv: str) -> None:
    assert main(["export", *argv]) == 0


def weights(path) -> dict[str, np.ndarray]:
    return {
        t.name: dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        for t in GGUFReader(path).tensors
    }


def applied(base: dict[str, np.ndarray], lora_path) -> dict[str, np.ndarray]:
    """The base weights with the GGUF LoRA added as llama.cpp's llama-adapter.cpp does."""
    reader = GGUFReader(lora_path)
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    lora = weights(lora_path)
    out = dict(base)
    for name in {n.rsplit(".", 1)[0] for n in lora}:
        A, B = lora[f"{name}.lora_a"], lora[f"{name}.lora_b"]  # [r, in], [out, r]
        out[name] = base[name] + alpha / B.shape[1] * (B @ A)
    return out


@pytest.mark.parametrize(
    ("fixture", "method", "adapted"),
    [
        # rsLoRA: llama.cpp's alpha / r scale is not the adapter's alpha / sqrt(r), so B is scaled.
        (
            "tiny_llama_dir",
            dict(targets="all-linear", rslora=True),
            ["attn_q", "attn_k", "ffn_gate"],
        ),
        # Pairs on q and v of GPT-2's fused c_attn: one attn_qkv pair of rank 8 (alpha_pattern).
        ("tiny_gpt2_dir", dict(targets=["c_attn.q", "c_attn.v", "c_fc"]), ["attn_qkv", "ffn_up"]),
    ],
    ids=["llama-gqa-rslora", "gpt2-fused-qkv"],
)
@pytest.mark.slow
def test_gguf_lora_on_the_base_gguf_is_the_merged_gguf(request, tmp_path, fixture, method, adapted):
    base_dir = request.getfixturevalue(fixture)
    trained_adapter(base_dir, tmp_path / "adapter", **method)
    f32 = ["--format", "gguf", "--quant", "f32"]
    export(*f32, "--model", str(base_dir), str(tmp_path / "base.gguf"))
    export(*f32, "--adapter", str(tmp_path / "adapter"), str(tmp_path / "merged.gguf"))
    export(
        "--format", "gguf-lora", "--adapter", str(tmp_path / "adapter"), str(tmp_path / "a.gguf")
    )

    reader = GGUFReader(tmp_path / "a.gguf")
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    family = "llama" if "llama" in fixture else "gpt2"
    assert fields["general.architecture"] == family
    assert (fields["general.type"], fields["adapter.type"]) == ("adapter", "lora")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert fields["adapter.lora.alpha"] == config["lora_alpha"]
    assert not any(k.startswith(("tokenizer.", f"{family}.")) for k in fields)  # tensors only
    tensors = {t.name: t for t in reader.tensors}
    for part in adapted:
        a, b = tensors[f"blk.1.{part}.weight.lora_a"], tensors[f"blk.1.{part}.weight.lora_b"]
        base = next(
            t
            for t in GGUFReader(tmp_path / "base.gguf").tensors
            if t.name == f"blk.1.{part}.weight"
        )
        # ggml shapes, as llama.cpp checks them: a [in, r], b [r, out] against the base [in, out].
        assert (a.shape[0], b.shape[1]) == tuple(base.shape) and a.shape[1] == b.shape[0]

    merged, base = weights(tmp_path / "merged.gguf"), weights(tmp_path / "base.gguf")
    got = applied(base, tmp_path / "a.gguf")
    assert got.keys() == merged.keys()
    name = f"blk.0.{adapted[0]}.weight"
    assert np.abs(merged[name] - base[name]).max() > 0.05  # the adapter does change it
    worst = max(float(np.abs(got[n] - merged[n]).max()) for n in merged)
    assert worst <= 1e-5  # measured 0.0 for both: the scales here are powers of two


# --- bad requests: one line, exit 2, nothing written --------------------------------------------


def refused(argv: list[str], capsys, tmp_path, *, keep: set[str]) -> str:
    capsys.readouterr()
    assert main(["export", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nanotune: error: ")
    assert {p.name for p in tmp_path.iterdir()} == keep  # no output, no temp file
    return err


@pytest.mark.slow
def test_adapters_llama_cpp_cannot_apply_are_refused(tiny_llama_dir, tmp_path, capsys):
    trained_adapter(tiny_llama_dir, tmp_path / "dora", targets=["q_proj"], dora=True)
    out = str(tmp_path / "a.gguf")
    err = refused(
        ["--format", "gguf-lora", "--adapter", str(tmp_path / "dora"), out],
        capsys,
        tmp_path,
        keep={"dora"},
    )
    assert "is a DoRA adapter" in err and "--format gguf --adapter" in err
    err = refused(
        ["--format", "gguf-lora", "--model", str(tiny_llama_dir), out],
        capsys,
        tmp_path,
        keep={"dora"},
    )
    assert "needs the adapter: --adapter DIR" in err
    err = refused(
        ["--format", "gguf-lora", "--quant", "q8_0", "--adapter", str(tmp_path / "dora"), out],
        capsys,
        tmp_path,
        keep={"dora"},
    )
    assert "writes f32 adapters" in err
    err = refused(
        ["--format", "gguf-lora", "--ollama", "--adapter", str(tmp_path / "dora"), out],
        capsys,
        tmp_path,
        keep={"dora"},
    )
    assert "--ollama" in err and "--format gguf" in err


def test_a_classifier_adapter_is_refused(tiny_llama_dir, tmp_path, capsys):
    from nanotune.methods import SequenceClassifier
    from nanotune.weights.classifier import save_classifier

    body, tokenizer = load_model(tiny_llama_dir)
    clf = SequenceClassifier(body, 2, ["no", "yes"])
    apply_method(clf, MethodConfig(name="lora", r=4, targets=["q_proj"]))
    save_classifier(clf, tmp_path / "clf", tokenizer, base_model=str(tiny_llama_dir))
    for fmt in ("gguf", "gguf-lora"):
        argv = ["--format", fmt, "--adapter", str(tmp_path / "clf"), str(tmp_path / "c.gguf")]
        assert "a classifier" in refused(argv, capsys, tmp_path, keep={"clf"})


@pytest.mark.slow
def test_an_existing_output_is_refused_before_anything_loads(tiny_llama_dir, tmp_path, capsys):
    trained_adapter(tiny_llama_dir, tmp_path / "adapter", targets=["q_proj"])
    (tmp_path / "a.gguf").write_bytes(b"mine")
    argv = [
        "--format",
        "gguf-lora",
        "--adapter",
        str(tmp_path / "adapter"),
        str(tmp_path / "a.gguf"),
    ]
    err = refused(argv, capsys, tmp_path, keep={"adapter", "a.gguf"})
    assert "already exists" in err and "--overwrite" in err
    assert (tmp_path / "a.gguf").read_bytes() == b"mine"
    err = refused([*argv, "--overwrite"], capsys, tmp_path, keep={"adapter", "a.gguf"})
    assert "nanotune did not write" in err  # --overwrite replaces only its own GGUF files
    (tmp_path / "a.gguf").unlink()
    assert main(["export", *argv]) == 0
    assert main(["export", *argv, "--overwrite"]) == 0
    assert GGUFReader(tmp_path / "a.gguf").fields["general.type"].contents() == "adapter"
    with pytest.raises(NanotuneError, match="is a GGUF LoRA adapter, not a model"):
        load_model(tmp_path / "a.gguf")
