"""Self-attention: every implementation against the float64 textbook formula, and the
hand-written gradient against JAX's derivative of that formula."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffussm_jax.models.attention import self_attention

SHAPE = (2, 12, 3, 3, 8)  # (B, T, 3, heads, head_dim)


def textbook_attention(qkv: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v, written as the formula; (B, T, 3, N, Hd) -> (B, T, N, Hd)."""
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(qkv.shape[-1])
    return jnp.einsum("bnqk,bknh->bqnh", jax.nn.softmax(logits, axis=-1), v)


def random_qkv(scale: float = 1.0, seed: int = 0) -> np.ndarray:
    return scale * np.random.default_rng(seed).normal(size=SHAPE)


def test_every_implementation_equals_the_float64_formula():
    qkv = random_qkv()
    with jax.enable_x64(True):
        expected = np.asarray(textbook_attention(jnp.asarray(qkv, jnp.float64)))
    for implementation in ("auto", "custom_vjp", "xla"):
        got = self_attention(jnp.asarray(qkv, jnp.float32), implementation)
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=implementation)
    with pytest.raises(ValueError, match=r"'flash'.*auto.*custom_vjp.*xla.*cudnn"):
        self_attention(jnp.asarray(qkv, jnp.float32), "flash")
    with pytest.raises(ValueError, match=r"\(B, T, 3, heads, head_dim\)"):
        self_attention(jnp.zeros((2, 12, 9, 8)))


def test_custom_gradient_equals_the_derivative_of_the_formula_in_float64():
    """Logits scaled 3x so that rows are peaked and the max subtraction matters."""
    qkv = random_qkv(scale=3.0)
    cotangent = np.random.default_rng(1).normal(size=(*SHAPE[:2], *SHAPE[3:]))
    with jax.enable_x64(True):
        qkv64, cot64 = jnp.asarray(qkv, jnp.float64), jnp.asarray(cotangent, jnp.float64)
        expected_out, expected_vjp = jax.vjp(textbook_attention, qkv64)
        got_out, got_vjp = jax.vjp(lambda x: self_attention(x, "custom_vjp"), qkv64)
        (expected_grad,), (got_grad,) = expected_vjp(cot64), got_vjp(cot64)
    assert got_grad.dtype == jnp.float64 and got_grad.shape == SHAPE
    np.testing.assert_allclose(got_out, expected_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got_grad, expected_grad, rtol=1e-10, atol=1e-12)
    # Each of q, k and v gets its own gradient in the stacked tensor.
    assert all(np.abs(np.asarray(got_grad)[:, :, i]).max() > 1e-3 for i in range(3))


def test_bfloat16_values_and_gradients_stay_within_bfloat16_rounding():
    qkv = jnp.asarray(random_qkv(), jnp.float32)
    cotangent = jnp.asarray(np.random.default_rng(1).normal(size=(*SHAPE[:2], *SHAPE[3:])))

    def value_and_grad(x):
        out, vjp = jax.vjp(lambda y: self_attention(y, "custom_vjp"), x)
        return out, vjp(cotangent.astype(x.dtype))[0]

    out32, grad32 = value_and_grad(qkv)
    out16, grad16 = value_and_grad(qkv.astype(jnp.bfloat16))
    assert out16.dtype == grad16.dtype == jnp.bfloat16
    # bfloat16 keeps 8 bits of mantissa: a relative step of 2^-8, a few of them compounded.
    np.testing.assert_allclose(np.float32(out16), out32, rtol=0, atol=3e-2)
    scale = float(jnp.abs(grad32).max())
    np.testing.assert_allclose(np.float32(grad16), grad32, rtol=0, atol=3e-2 * scale)


def test_no_score_sized_constant_is_materialised():
    """The 1/sqrt(Hd) scale goes on q, not on the (B, N, T, T) logits: on XLA:CPU a scalar
    times the logits in their matmul's fusion was compiled into a broadcast constant of the
    scores' size, written on every step (8% of a DiT p1 train step at 1024 tokens)."""
    batch, tokens, heads, head_dim = 2, 64, 2, 8
    qkv = jnp.ones((batch, tokens, 3, heads, head_dim))
    grad = jax.jit(jax.grad(lambda x: self_attention(x, "custom_vjp").sum()))
    hlo = grad.lower(qkv).compile().as_text()
    scores = rf"= f32\[{batch},{heads},{tokens},{tokens}\]\S* (broadcast|fusion)\(%constant"
    assert not [line for line in hlo.splitlines() if re.search(scores, line)]
