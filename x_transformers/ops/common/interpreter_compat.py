"""Three fixes to the Triton interpreter (TRITON_INTERPRET=1), which runs our kernels on CPU in tests and CI; the
ops apply them before their first kernel launch under the interpreter (`utils.require_triton`).

1. Loops with run-time bounds under NumPy >= 2.4. Triton 3.6's interpreter holds scalars as 1-element arrays and
turns them into loop bounds with `int(array)`, which NumPy 2.4 rejects for arrays with ndim > 0 ("only 0-dimensional
arrays can be converted to Python scalars"). Every chunked kernel loops `for i_t in range(NT)` with NT known only at
run time, so we read the one element explicitly instead (3.7 and later read it themselves; there it changes nothing).
2. `tl.dot` on bfloat16 blocks: the interpreter keeps bf16 as raw uint16 bits and multiplied the bits; we widen both
operands to fp32 first (exact, and what the tensor cores accumulate in anyway).
3. fp32 -> bf16 casts: the interpreter truncates, GPUs round to nearest even; truncation biases every rounded value
towards zero, and the bias adds up coherently in long sums, so we round to nearest even as the hardware does.

2 and 3 are needed on every Triton from 3.6 to 3.9 (tests/ops/test_interpreter_compat.py checks all three). Compiled
(GPU) kernels are unaffected; calling `patch()` more than once is harmless.
"""

from __future__ import annotations

_patched = False


def patch():
    global _patched
    if _patched:
        return
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch_lang_tensor

    import numpy as np
    import triton.language as tl

    builder = interpreter.InterpreterBuilder
    create_dot = builder.create_dot

    def widen(x):
        if x.dtype != tl.bfloat16:
            return x
        bits = x.data.astype(np.uint32) << np.uint32(16)
        return interpreter.TensorHandle(bits.view(np.float32), tl.float32)

    def create_dot_bf16(self, a, b, d, input_precision, max_num_imprecise_acc):
        return create_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot_bf16

    cast_impl = builder.cast_impl

    def cast_rtne(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32)
            rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
            # keep NaN a NaN (rounding could carry it into inf)
            rounded = np.where(np.isnan(src.data), np.uint32(0x7FC0), rounded)
            return interpreter.TensorHandle(rounded.astype(np.uint16), tl.bfloat16)
        return cast_impl(self, src, dst_type)

    builder.cast_impl = cast_rtne
    for name in ("create_fp_trunc",):
        setattr(builder, name, lambda self, src, dst_type: self.cast_impl(src, dst_type))
    _patched = True
