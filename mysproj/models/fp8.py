"""FP8 (e4m3) matmuls for frozen `nn.Linear` layers: Hopper's FP8 tensor cores run about twice the bf16 rate.

Where it applies: projector-only fine-tuning (the 7B LLM is frozen, only input gradients flow through it) and
evaluation (every weight frozen). `convert_frozen_linears(model)` swaps each qualifying frozen Linear for a
`Float8Linear`, which keeps the original `weight`/`bias` parameters (state_dict, export and merge see nothing new)
and holds quantized copies in non-persistent buffers, built once because the weights do not change.

Why rowwise scaling: one fp32 scale per token row of the activation and per output row of the weight.
A single per-tensor scale lets one outlier token (LLaMA has large activation outliers) squeeze every other row
into e4m3's 3-bit mantissa and subnormals; per-row scales keep each row's own range, are computed on the fly
(no amax history to manage), and `torch._scaled_mm` applies them in the GEMM epilogue at no extra pass.

Why a transposed copy of the weight: on sm90 `_scaled_mm` only multiplies a row-major first operand by a
column-major second one. The forward needs W.T column-major, which is W row-major as stored (`w8.t()`). The
input gradient grad_x = grad_y @ W needs W column-major, i.e. W.T row-major, and its scales must be constant
along the contraction dimension (now the output features), so the weight is quantized a second time, per input
feature, into `w8_t`. Evaluation-only users can skip it (`keep_transposed=False`); the input gradient then falls
back to a plain matmul with the original weight.

`_scaled_mm`'s CUDA rules (torch 2.14, aten/src/ATen/native/cuda/ScaledBlas.cpp), all met on every path, CPU
included: K and N multiples of 16 (M is free, no padding needed); rowwise scales fp32, contiguous, [M, 1] and
[1, N]; output bf16, fp16 or fp32 (cuBLAS outer-vector scaling and the CUTLASS kernel both accept all three);
a fused bias only for bf16/fp16 output of the same dtype, so other biases are added after the GEMM.
Anything else runs as the plain `F.linear` it replaced: inputs that are not bf16/fp16/fp32, devices without FP8
(CUDA below sm89, non-CUDA accelerators), and a weight that was made trainable after conversion.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
GEMM_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def quantize_rowwise(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D `t` [R, C] -> (t8 [R, C] e4m3 row-major, inv_scale [R, 1] fp32) with t ~= t8.float() * inv_scale.

    Each row is scaled so its largest magnitude lands on e4m3's maximum (448); an all-zero row gets a huge but
    finite scale (amax clamped at 1e-12) and stays zero. The clamp guards the cast, which is not saturating on
    every backend."""
    amax = torch.linalg.vector_norm(t, float("inf"), dim=-1, keepdim=True, dtype=torch.float32)
    scale = FP8_MAX / amax.clamp(min=1e-12)
    t8 = (t * scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return t8.contiguous(), scale.reciprocal()


def _scaled_matmul(a, b8_t, b_inv_scale, bias, out_dtype):
    """a [M, K] (high precision, quantized here) @ b8_t.T [K, N] (already e4m3) (+ bias) in `out_dtype`."""
    a8, a_inv_scale = quantize_rowwise(a)
    fuse_bias = bias is not None and bias.dtype == out_dtype and out_dtype != torch.float32
    y = torch._scaled_mm(a8, b8_t.t(), scale_a=a_inv_scale, scale_b=b_inv_scale,
                         bias=bias if fuse_bias else None, out_dtype=out_dtype)
    if bias is not None and not fuse_bias:
        y = y + bias.to(out_dtype)
    return y


class _Float8Matmul(torch.autograd.Function):
    """y = x @ W.T + b with frozen W and b: the backward returns the gradient for x only. Only the layer's
    fixed weight copies are saved, never x, so a step costs no activation memory here."""

    @staticmethod
    def forward(ctx, x2d, w8, w8_inv_scale, bias, w8_t, w8_t_inv_scale, weight, out_dtype):
        ctx.x_dtype = x2d.dtype
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(*((weight,) if w8_t is None else (w8_t, w8_t_inv_scale)))
        if w8 is None:  # backward-only FP8: the forward (and so the loss) is the plain matmul's
            return F.linear(x2d.to(out_dtype), weight.to(out_dtype), None if bias is None else bias.to(out_dtype))
        return _scaled_matmul(x2d, w8, w8_inv_scale, bias, out_dtype)

    @staticmethod
    def backward(ctx, grad_y):
        saved = ctx.saved_tensors
        if len(saved) == 1:  # no transposed copy kept: plain matmul with the original weight
            grad_x = grad_y.to(saved[0].dtype) @ saved[0]
        else:
            grad_x = _scaled_matmul(grad_y, *saved, None, ctx.x_dtype)
        return grad_x.to(ctx.x_dtype), None, None, None, None, None, None, None


@functools.cache
def fp8_capable(device_type: str, index: int | None) -> bool:
    """FP8 GEMMs exist on Ada/Hopper (compute capability 8.9) and later; CPUs run `_scaled_mm` too (slowly)."""
    if device_type == "cpu":
        return True
    return device_type == "cuda" and torch.cuda.get_device_capability(index) >= (8, 9)


class Float8Linear(nn.Module):
    """A frozen `nn.Linear` whose matmuls (forward and input gradient) run in FP8 with rowwise scales.

    `forward_fp8=False` keeps the forward in the input's precision and runs only the input gradient in FP8:
    the loss is exactly the plain layer's, the gradients carry FP8's rounding (as FP8 training recipes do for
    gradients), and half of a frozen layer's matmul work still runs at the FP8 rate.

    `weight`/`bias` are the original Parameters, so `state_dict()` is unchanged. Call `refresh()` after
    changing the weight in place (`load_state_dict` does it through a hook)."""

    def __init__(self, linear: nn.Linear, *, keep_transposed: bool = True, forward_fp8: bool = True):
        super().__init__()
        if linear.in_features % 16 or linear.out_features % 16:
            raise ValueError(f"FP8 GEMMs need in/out features divisible by 16, got {linear.weight.shape[::-1]}")
        if not (forward_fp8 or keep_transposed):
            raise ValueError("Float8Linear with neither an FP8 forward nor an FP8 input gradient does nothing")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.keep_transposed, self.forward_fp8 = keep_transposed, forward_fp8
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)
        for name in ("w8", "w8_inv_scale", "w8_t", "w8_t_inv_scale"):
            self.register_buffer(name, None, persistent=False)
        self.refresh()
        self.register_load_state_dict_post_hook(Float8Linear._refresh_after_load)  # a function, so it pickles

    @torch.no_grad()
    def refresh(self) -> None:
        """Rebuild the e4m3 copies from the current weight."""
        w = self.weight.detach()
        if self.forward_fp8:
            self.w8, inv = quantize_rowwise(w)  # [N, K]: one scale per output feature
            self.w8_inv_scale = inv.reshape(1, -1)
        if self.keep_transposed:
            self.w8_t, inv_t = quantize_rowwise(w.t())  # [K, N]: one scale per input feature
            self.w8_t_inv_scale = inv_t.reshape(1, -1)

    @staticmethod
    def _refresh_after_load(module: Float8Linear, _incompatible_keys) -> None:
        module.refresh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frozen = not self.weight.requires_grad and (self.bias is None or not self.bias.requires_grad)
        if not (frozen and x.dtype in GEMM_DTYPES and fp8_capable(x.device.type, x.device.index)):
            return F.linear(x, self.weight, self.bias)
        quantized = self.w8 if self.forward_fp8 else self.w8_t
        if quantized.dtype != FP8 or quantized.device != self.weight.device:  # after module.to(dtype) / .half()
            self.refresh()
        device_type = x.device.type
        out_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        y = _Float8Matmul.apply(x.reshape(-1, self.in_features), self.w8, self.w8_inv_scale, self.bias, self.w8_t,
                                self.w8_t_inv_scale, self.weight, out_dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"fp8={'forward+backward' if self.forward_fp8 else 'backward'}")


def convert_frozen_linears(module: nn.Module, *, exclude: tuple[str, ...] = (), min_features: int = 1024,
                           keep_transposed: bool = True, forward_fp8: bool = True) -> list[str]:
    """Replace, in place, every plain `nn.Linear` under `module` that is frozen (no parameter requires grad),
    has in/out features divisible by 16 and at least `min_features`, and whose qualified name contains none of
    `exclude`. Returns the qualified names converted.

    `min_features` (smaller of in/out) keeps small layers, where the per-call activation quantization costs
    more than the GEMM saves, in bf16; 1024 is a guess to be set from measurements. Subclasses of `nn.Linear`
    are left alone (their forward may differ). `keep_transposed=False` saves one byte per weight when no
    gradient flows (evaluation); `forward_fp8=False` converts the input gradients only (see `Float8Linear`)."""
    targets = []
    for parent_name, parent in module.named_modules():
        for child_name, child in parent.named_children():
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if (type(child) is nn.Linear and not any(p.requires_grad for p in child.parameters())
                    and child.in_features % 16 == 0 and child.out_features % 16 == 0
                    and min(child.in_features, child.out_features) >= min_features
                    and child.weight.dtype in GEMM_DTYPES and not any(s in name for s in exclude)):
                targets.append((parent, child_name, name, child))
    for parent, child_name, _name, child in targets:
        setattr(parent, child_name, Float8Linear(child, keep_transposed=keep_transposed, forward_fp8=forward_fp8))
    return [name for _parent, _child_name, name, _child in targets]
