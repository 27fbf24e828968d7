"""Softmax self-attention for DiT, with a backward pass written for the score matrix's cost.

    out = self_attention(qkv)        # qkv (B, T, 3, N, Hd) -> (B, T, N, Hd)

Notation: B batch, T tokens, N heads, Hd = head size, S = (B, N, T, T) the scores. For one head

    S = q k^T / sqrt(Hd),   P = softmax(S) row-wise,   out = P v.

Implementations (`implementation=`):

  "custom_vjp"  the formula above with a hand-written gradient (below); float32 logits and
                softmax whatever the input dtype.
  "xla"         `jax.nn.dot_product_attention` with JAX's own derivative.
  "cudnn"       cuDNN's fused (flash) attention, NVIDIA GPUs with bfloat16 / float16 inputs.
  "auto"        cuDNN where it runs, else "custom_vjp".

Why a hand-written gradient: JAX differentiates softmax as written, so its backward pass walks
the (B, N, T, T) scores about a dozen times (the max, the exponentials, the normaliser, their
derivatives), and the gradients of q, k and v sliced out of qkv come back as three zero-padded
copies of qkv that are summed. The one here keeps the unnormalised probabilities
p = exp(S - max S) and their row sums l, and uses two identities to stay on (T, Hd) tensors
wherever it can:

  - out = (p v) / l: the division by l is on the (T, Hd) output, not on the (T, T) scores;
  - with G = dOut / l, the softmax derivative's row term sum_k P dP equals the (T,) vector
    delta = sum_h G * out, so dS = p * (G v^T - delta) needs one pass over the scores;

and returns dq, dk, dv stacked as one (B, T, 3, N, Hd) tensor.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "custom_vjp", "xla", "cudnn")


def self_attention(qkv: jax.Array, implementation: str = "auto") -> jax.Array:
    """Multi-head softmax self-attention. qkv (B, T, 3, N, Hd) -> (B, T, N, Hd) in qkv's dtype.

    The logits and the softmax are float32 for bfloat16 / float16 inputs in every
    implementation: softmax exponentiates logit differences, so bfloat16's 8-bit mantissa
    would turn rounding into visible weight errors.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"attention implementation {implementation!r}; choose one of {IMPLEMENTATIONS}."
        )
    if qkv.ndim != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv must be (B, T, 3, heads, head_dim), got {qkv.shape}.")
    if implementation == "auto":
        if jax.default_backend() == "gpu" and qkv.dtype in (jnp.bfloat16, jnp.float16):
            try:
                return _library_attention(qkv, "cudnn")
            except (NotImplementedError, RuntimeError, ValueError):
                pass  # cuDNN missing or this shape unsupported
        implementation = "custom_vjp"
    if implementation == "custom_vjp":
        return _attention(qkv)
    return _library_attention(qkv, implementation)


def _library_attention(qkv: jax.Array, implementation: str) -> jax.Array:
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation)


def _accumulation_dtype(dtype) -> jnp.dtype:
    return jnp.promote_types(dtype, jnp.float32)


def _scaled_q(qkv: jax.Array) -> jax.Array:
    """q / sqrt(Hd), in q's dtype: the scale is applied to the (T, Hd) queries, not to the
    (T, T) logits. On XLA:CPU a scalar times the logits inside their matmul's fusion became a
    broadcast constant of the scores' size, (8, 4, 1024, 1024) float32 written on every step:
    8% of the DiT p1 step (docs/benchmarks, "CPU proxies, 2026-12-07, second host")."""
    return qkv[:, :, 0] * jnp.asarray(qkv.shape[-1] ** -0.5, qkv.dtype)


def _forward(qkv: jax.Array):
    """(out (B, T, N, Hd), residuals for the backward pass)."""
    dtype, acc = qkv.dtype, _accumulation_dtype(qkv.dtype)
    q, k, v = _scaled_q(qkv), qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum("bqnh,bknh->bnqk", q, k, preferred_element_type=acc)
    # p is exp of logits shifted by their row maximum (so at most 1); l its row sums.
    p = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True)).astype(dtype)  # (B, N, T, T)
    row_sums = jnp.sum(p, axis=-1, dtype=acc)  # (B, N, T)
    unnormalised = jnp.einsum("bnqk,bknh->bqnh", p, v, preferred_element_type=acc)
    inv_sums = 1 / jnp.swapaxes(row_sums, 1, 2)[..., None]  # (B, T, N, 1)
    out = (unnormalised * inv_sums).astype(dtype)
    return out, (qkv, p, inv_sums, out)


@jax.custom_vjp
def _attention(qkv: jax.Array) -> jax.Array:
    return _forward(qkv)[0]


def _backward(residuals, d_out: jax.Array) -> tuple[jax.Array]:
    qkv, p, inv_sums, out = residuals
    dtype, acc = qkv.dtype, _accumulation_dtype(qkv.dtype)
    q, k, v = _scaled_q(qkv), qkv[:, :, 1], qkv[:, :, 2]
    g = d_out.astype(acc) * inv_sums  # G = dOut / l, (B, T, N, Hd)
    delta = jnp.sum(g * out.astype(acc), axis=-1)  # (B, T, N)
    g = g.astype(dtype)
    d_v = jnp.einsum("bnqk,bqnh->bknh", p, g, preferred_element_type=acc)
    d_p = jnp.einsum("bqnh,bknh->bnqk", g, v, preferred_element_type=acc)  # G v^T
    d_logits = (p * (d_p - jnp.swapaxes(delta, 1, 2)[..., None])).astype(dtype)
    # The logits are (q / sqrt(Hd)) k^T: dq takes the scale on (T, Hd), dk gets it from q.
    d_q = jnp.einsum("bnqk,bknh->bqnh", d_logits, k, preferred_element_type=acc)
    d_q = d_q * qkv.shape[-1] ** -0.5
    d_k = jnp.einsum("bnqk,bqnh->bknh", d_logits, q, preferred_element_type=acc)
    return (jnp.stack([d_q, d_k, d_v], axis=2).astype(dtype),)


_attention.defvjp(_forward, _backward)
