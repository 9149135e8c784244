"""Make the Triton interpreter (TRITON_INTERPRET=1) accept loops with run-time bounds under NumPy >= 2.4.

The interpreter holds scalars as 1-element arrays and turns them into loop bounds with `int(array)`, which NumPy 2.4
rejects for arrays with ndim > 0 ("only 0-dimensional arrays can be converted to Python scalars"). Every chunked
kernel loops `for i_t in range(NT)` with NT known only at run time, so we read the one element explicitly instead.
Compiled (GPU) kernels are unaffected; calling `patch()` more than once is harmless.
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
    _patched = True
