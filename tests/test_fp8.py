"""FP8 frozen Linears (mysproj.models.fp8) on CPU, where `torch._scaled_mm` runs the same rowwise-scaled math."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mysproj.models.fp8 import FP8, Float8Linear, convert_frozen_linears, quantize_rowwise

# (rtol, atol) for "the op does exactly the quantized math": only the output dtype's rounding separates them
EXACT_TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (1.6e-2, 2e-2), torch.float16: (2e-3, 2e-3)}


def _dequant(t8, inv_scale):
    return t8.float() * inv_scale.reshape(t8.shape[0], 1)


def _rel_err(actual, expected):
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def _frozen_linear(in_features, out_features, dtype, bias=True, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias).to(dtype)
    return linear.requires_grad_(False)


def test_quantize_rowwise_bounds_the_error_per_row():
    torch.manual_seed(0)
    t = torch.randn(64, 48) * torch.logspace(-3, 3, 64).unsqueeze(1)  # rows of very different ranges
    t[5] = 0
    t8, inv = quantize_rowwise(t.t())  # a transposed (column-major) input must still give row-major e4m3
    assert t8.dtype == FP8 and t8.is_contiguous() and t8.shape == (48, 64) and inv.shape == (48, 1)
    t = t.t()
    assert t8.float().abs().amax(dim=1).eq(448).all()  # every non-zero row uses e4m3's full range
    err = (_dequant(t8, inv) - t).abs()
    # e4m3: 3 mantissa bits (half-ulp 2^-4 relative) down to subnormals (absolute 2^-10 in scaled units)
    assert (err <= t.abs() * 2**-4 + inv * 2**-10 + 1e-12).all()
    t8_zero, _ = quantize_rowwise(torch.zeros(2, 16))
    assert t8_zero.float().eq(0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_is_the_quantized_math_and_close_to_linear(dtype, bias):
    linear = _frozen_linear(128, 64, dtype, bias=bias)
    layer = Float8Linear(linear)
    x = torch.randn(2, 5, 128).to(dtype)

    y = layer(x)

    assert y.shape == (2, 5, 64) and y.dtype == dtype
    x8, x_inv = quantize_rowwise(x.reshape(-1, 128))
    b = None if linear.bias is None else linear.bias.float()
    quantized_ref = F.linear(_dequant(x8, x_inv), _dequant(layer.w8, layer.w8_inv_scale), b).reshape(2, 5, 64)
    rtol, atol = EXACT_TOL[dtype]
    torch.testing.assert_close(y.float(), quantized_ref, rtol=rtol, atol=atol)
    err = _rel_err(y, F.linear(x.float(), linear.weight.float(), b))
    assert 2e-3 < err < 0.05  # FP8 was used (not a silent fallback) and stays within a few %


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_input_gradient_is_quantized_dgrad_and_weights_get_none(dtype):
    layer = Float8Linear(_frozen_linear(128, 64, dtype))
    x = torch.randn(3, 4, 128).to(dtype).requires_grad_(True)
    grad_y = torch.randn(3, 4, 64).to(dtype)

    layer(x).backward(grad_y)

    assert x.grad.dtype == dtype and x.grad.shape == x.shape
    assert layer.weight.grad is None and layer.bias.grad is None
    g8, g_inv = quantize_rowwise(grad_y.reshape(-1, 64))
    w_t = _dequant(layer.w8_t, layer.w8_t_inv_scale)  # [in, out], scaled per input feature
    quantized_ref = (_dequant(g8, g_inv) @ w_t.t()).reshape(3, 4, 128)
    rtol, atol = EXACT_TOL[dtype]
    torch.testing.assert_close(x.grad.float(), quantized_ref, rtol=rtol, atol=atol)
    assert 2e-3 < _rel_err(x.grad, grad_y.float() @ layer.weight.float()) < 0.05


def test_autograd_saves_only_the_weight_copies_never_x():
    layer = Float8Linear(_frozen_linear(128, 64, torch.bfloat16))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y_frozen_input = layer(torch.randn(8, 128, dtype=torch.bfloat16))
        assert not y_frozen_input.requires_grad and saved == []
        layer(torch.randn(8, 128, dtype=torch.bfloat16, requires_grad=True))
    assert {t.data_ptr() for t in saved} == {layer.w8_t.data_ptr(), layer.w8_t_inv_scale.data_ptr()}


def test_without_transposed_copy_the_input_gradient_uses_the_original_weight():
    layer = Float8Linear(_frozen_linear(128, 64, torch.float32), keep_transposed=False)
    assert layer.w8_t is None
    x = torch.randn(6, 128, requires_grad=True)
    grad_y = torch.randn(6, 64)
    layer(x).backward(grad_y)
    torch.testing.assert_close(x.grad, grad_y @ layer.weight)


def test_weight_made_trainable_after_conversion_falls_back_to_linear():
    linear = _frozen_linear(128, 64, torch.float32)
    layer = Float8Linear(linear)
    layer.weight.requires_grad_(True)
    x = torch.randn(4, 128)
    y = layer(x)
    torch.testing.assert_close(y, F.linear(x, linear.weight, linear.bias), rtol=0, atol=0)
    y.sum().backward()
    assert layer.weight.grad is not None


def test_dtype_cast_and_autocast_follow_linear_semantics():
    layer = Float8Linear(_frozen_linear(128, 64, torch.float32)).to(torch.bfloat16)  # casts w8 too
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    y = layer(x)
    assert layer.w8.dtype == FP8 and layer.w8_inv_scale.dtype == torch.float32 and y.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x.float()).dtype == torch.bfloat16


def _model(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 128)).to(dtype)
    return model.requires_grad_(False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_converted_mlp_stays_close_to_the_original(dtype):
    model = _model(dtype)
    x = torch.randn(4, 7, 128).to(dtype)
    expected = model(x)
    assert convert_frozen_linears(model, min_features=16) == ["0", "2"]
    assert all(isinstance(model[i], Float8Linear) for i in (0, 2))
    # e4m3 rounds each operand by ~2.6% RMS, ~3.7% per GEMM on Gaussian data; two GEMMs in a row compound
    assert _rel_err(model(x), expected) < 0.07


def test_state_dict_is_unchanged_and_loading_refreshes_the_copies():
    model = _model(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    convert_frozen_linears(model, min_features=16)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) and after[k].dtype == before[k].dtype for k in before)

    doubled = {k: v * 2 for k, v in before.items()}
    model.load_state_dict(doubled)
    w = _dequant(model[0].w8, model[0].w8_inv_scale)
    assert _rel_err(w, doubled["0.weight"]) < 0.05


def test_convert_skips_trainable_excluded_small_and_odd_linears():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.keep = nn.Linear(128, 64)
            self.block = nn.Sequential(nn.Linear(64, 64), nn.ReLU())
            self.train_me = nn.Linear(128, 64)
            self.trainable_bias = nn.Linear(128, 64)
            self.lm_head = nn.Linear(64, 128)
            self.odd = nn.Linear(100, 64)
            self.small = nn.Linear(32, 32)

    net = Net().requires_grad_(False)
    net.train_me.requires_grad_(True)
    net.trainable_bias.bias.requires_grad_(True)

    converted = convert_frozen_linears(net, exclude=("lm_head",), min_features=64)

    assert converted == ["keep", "block.0"]
    assert isinstance(net.keep, Float8Linear) and isinstance(net.block[0], Float8Linear)
    for name in ("train_me", "trainable_bias", "lm_head", "odd", "small"):
        assert type(getattr(net, name)) is nn.Linear
    with pytest.raises(ValueError, match="divisible by 16"):
        Float8Linear(nn.Linear(100, 64))


def test_backward_only_keeps_the_forward_and_quantizes_the_input_gradient():
    linear = _frozen_linear(128, 64, torch.float32)
    layer = Float8Linear(linear, forward_fp8=False)
    assert layer.w8 is None and layer.w8_t.dtype == FP8
    x = torch.randn(6, 128, requires_grad=True)
    y = layer(x)
    assert torch.equal(y, F.linear(x, linear.weight, linear.bias))
    g = torch.randn(6, 64)
    y.backward(g)
    g8, g_inv = quantize_rowwise(g)
    expected = _dequant(g8, g_inv) @ _dequant(layer.w8_t, layer.w8_t_inv_scale).t()
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-4)
    assert 2e-3 < _rel_err(x.grad, g @ linear.weight) < 0.05
    with pytest.raises(ValueError, match="does nothing"):
        Float8Linear(linear, forward_fp8=False, keep_transposed=False)
