"""models.linear: the oneDNN float32 path gives F.linear's values and gradients."""

import pytest
import torch
import torch.nn.functional as F

from nanotune.models import linear as lin

pytestmark = pytest.mark.skipif(not lin.ONEDNN, reason="no oneDNN matmul in this torch build")


@pytest.mark.parametrize("shape", [(3, 5, 32), (7, 32)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("train_weight", [True, False])
def test_onednn_linear_matches_f_linear(shape, bias, train_weight):
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    w = torch.randn(48, 32, requires_grad=train_weight)
    b = torch.randn(48, requires_grad=True) if bias else None
    grad = torch.randn(*shape[:-1], 48)

    ours = lin.linear(x, w, b)
    assert ours.grad_fn is not None and "OneDNN" in type(ours.grad_fn).__name__
    ours.backward(grad)
    got = [t.grad for t in (x, w, b) if t is not None and t.requires_grad]
    for t in (x, w, b):
        if t is not None:
            t.grad = None
    F.linear(x, w, b).backward(grad)
    want = [t.grad for t in (x, w, b) if t is not None and t.requires_grad]

    torch.testing.assert_close(ours, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    for g, e in zip(got, want, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_non_float32_and_no_grad_paths():
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    assert lin._onednn_dtype(x.bfloat16(), w.bfloat16(), None) is None  # bf16 weights: F.linear
    with torch.autocast("cpu", dtype=torch.float16):
        assert lin._onednn_dtype(x, w, None) is None  # fp16 autocast: F.linear
    with torch.no_grad():
        torch.testing.assert_close(lin.linear(x, w), x @ w.T)


@pytest.mark.parametrize("train_weight", [True, False])
def test_bf16_autocast_matches_autocast_f_linear(train_weight):
    """Under CPU bf16 autocast the oneDNN path multiplies in bf16 as autocast's F.linear does:
    the same values and gradients to bf16's precision, float32 gradients for float32 masters."""
    torch.manual_seed(0)
    x = torch.randn(5, 64, requires_grad=True)
    w = torch.randn(48, 64, requires_grad=train_weight)
    b = torch.randn(48, requires_grad=True)
    grad = torch.randn(5, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = lin.linear(x, w, b)
    assert ours.dtype == torch.bfloat16 and "OneDNN" in type(ours.grad_fn).__name__
    ours.backward(grad)
    got = [t.grad for t in (x, w, b) if t.requires_grad]
    assert all(g.dtype == torch.float32 for g in got)
    for t in (x, w, b):
        t.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want_out = F.linear(x, w, b)
    want_out.backward(grad)
    want = [t.grad for t in (x, w, b) if t.requires_grad]
    torch.testing.assert_close(ours, want_out, rtol=2e-2, atol=5e-2)
    for g, e in zip(got, want, strict=True):
        torch.testing.assert_close(g, e, rtol=2e-2, atol=5e-2)


def test_a_frozen_weight_is_cast_to_bf16_once_and_again_after_it_changes():
    x, w = torch.randn(3, 16), torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = lin.linear(x, w)
        copy = lin.frozen_bf16(w)
        lin.linear(x, w)
        assert lin.frozen_bf16(w) is copy  # reused, not cast again
        with torch.no_grad():
            w.mul_(2)  # an in-place change (a merge, a load) bumps the version
        assert lin.frozen_bf16(w) is not copy
        torch.testing.assert_close(lin.linear(x, w), 2 * first, rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(lin.frozen_bf16(w), w.bfloat16(), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(1, 64, 48), (5, 32, 96), (3, 24, 40)])  # the last: no kernel
def test_int8_linear_is_its_dequantized_product_within_int8_rounding(shape):
    M, K, N = shape
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g), torch.randn(N)
    layer = lin.Int8Linear.quantize(w, b)
    assert layer.qweight.dtype == torch.int8 and layer.qweight.shape == (N, K)
    assert layer.scales.dtype == torch.bfloat16 and layer.scales.shape == (N,)
    # Per output channel, the int8 grid is absmax / 127: no weight moves by more than half a step.
    step = w.abs().amax(1, keepdim=True) / 127
    assert ((layer.qweight.float() * step - w).abs() <= step / 2 + 1e-6).all()
    y = layer(x[None])  # leading dimensions are kept
    assert y.shape == (1, M, N) and y.dtype == torch.bfloat16
    exact = F.linear(x, w, b)
    assert (y[0].float() - exact).abs().max() < 0.03 * exact.abs().max()
    torch.testing.assert_close(
        y[0].float(),
        (x.bfloat16() @ layer.dequantized().T + layer.bias).float(),
        atol=0.02 * exact.abs().max().item(),
        rtol=0.02,
    )


def test_quantize_int8_replaces_every_linear_and_gives_a_tied_head_its_own_copy():
    from tiny import tiny_config

    from nanotune.models import Transformer

    torch.manual_seed(0)
    model = Transformer(tiny_config("gpt2")).eval()
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        want = model(ids)
        lin.quantize_int8(model).to(torch.bfloat16)
        got = model(ids).float()
    assert not [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert isinstance(model.lm_head, lin.Int8Linear) and model.wte.weight.dtype == torch.bfloat16
    assert not [t for t in model.state_dict().values() if t.dtype == torch.float32]
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


@pytest.mark.skipif(not lin.ONEDNN_BF16, reason="oneDNN is off or has no bf16 on this CPU")
@pytest.mark.parametrize("rows", [1, 8, 77])
def test_a_packed_bf16_linear_is_bit_identical_to_f_linear(rows):
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=g).bfloat16() for s in ((2, rows, 64), (96, 64), (96,)))
    layer = lin.PackedLinear(w, b)
    assert layer.weight.is_mkldnn and layer.weight.shape == (96, 64)
    assert (layer.in_features, layer.out_features) == (64, 96)
    assert torch.equal(layer(x), F.linear(x, w, b))
    # A strided input is read as its dense copy (F.linear itself rounds some strided ones
    # differently from their copies).
    assert torch.equal(layer(x[:, ::2]), F.linear(x[:, ::2].contiguous(), w, b))
    assert layer(x[:, :0]).shape == (2, 0, 96)


@pytest.mark.slow
@pytest.mark.skipif(not lin.ONEDNN_BF16, reason="oneDNN is off or has no bf16 on this CPU")
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_pack_bf16_decodes_the_same_tokens_as_the_unpacked_bf16_model(arch):
    from tiny import tiny_config

    from nanotune.generate import GenerationConfig, generate_ids
    from nanotune.models import Transformer

    torch.manual_seed(0)
    model = Transformer(tiny_config(arch)).eval().to(torch.bfloat16)
    prompts = [[5, 9, 2, 33], [7], [1, 2, 3, 4, 5, 6, 7, 8]]
    gen = GenerationConfig(max_new_tokens=10, stop_token_ids=())
    with torch.no_grad():
        want_logits = model(torch.tensor([prompts[2]]))
        want = generate_ids(model, prompts, gen)
        lin.pack_bf16(model)
        got_logits = model(torch.tensor([prompts[2]]))
        got = generate_ids(model, prompts, gen)
    assert not [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert isinstance(model.lm_head, lin.PackedLinear) and not model.wte.weight.is_mkldnn
    assert torch.equal(got_logits, want_logits) and got == want


def test_pack_bf16_leaves_layers_alone_where_onednn_has_no_bf16(monkeypatch):
    from tiny import tiny_config

    from nanotune.models import Transformer

    monkeypatch.setattr(lin, "ONEDNN_BF16", False)
    model = Transformer(tiny_config("llama")).eval().to(torch.bfloat16)
    lin.pack_bf16(model)
    assert not [m for m in model.modules() if isinstance(m, lin.PackedLinear)]
    with torch.no_grad():
        assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, model.config.vocab_size)


@pytest.mark.slow
@pytest.mark.skipif(not lin.ONEDNN, reason="no oneDNN in this torch build")
def test_a_compiled_decode_product_takes_onednn_from_enough_rows(monkeypatch):
    """Inside a compiled graph, a float32 product without gradients of at least
    COMPILED_ONEDNN_ROWS rows is oneDNN's own call (bit-equal to eager `linear`), fewer rows
    and products needing gradients are inductor's (F.linear's values, to rounding)."""
    calls = []
    real = lin._mm
    monkeypatch.setattr(lin, "_mm", lambda *a: calls.append(a[0].shape) or real(*a))
    torch.manual_seed(0)
    w, b = torch.randn(48, 64), torch.randn(48)
    step = torch.compile(lambda x: lin.linear(x, w, b), dynamic=False)
    for rows in (lin.COMPILED_ONEDNN_ROWS, 1):
        x = torch.randn(rows, 1, 64)
        calls.clear()
        with torch.no_grad():
            got = step(x)
        assert bool(calls) == (rows >= lin.COMPILED_ONEDNN_ROWS)
        if calls:
            assert torch.equal(got, real(x, w, b))
        torch.testing.assert_close(got, F.linear(x, w, b))
    x = torch.randn(8, 1, 64, requires_grad=True)
    calls.clear()
    step(x).sum().backward()
    assert not calls and x.grad is not None
