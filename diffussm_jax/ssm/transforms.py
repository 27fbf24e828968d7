"""The FFTs of the fft backend: fast transform lengths, and rfft / irfft along the last axis
that keep the leading axes' sharding under the SPMD partitioner."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# FFT lengths are chosen among odd * 2^k for these odd parts (2^a 3^b 5^c, b <= 2, c <= 1).
FFT_ODD_FACTORS = (1, 3, 5, 9, 15, 45)


def fft_size(min_length: int) -> int:
    """Smallest n >= min_length of the form odd * 2^k with odd in FFT_ODD_FACTORS.

    FFT time depends on the length's prime factors. On XLA:CPU (ducc) 2047 = 23 * 89 takes
    1.9x as long as 2048 and 2025 = 3^4 5^2 1.2x, while 2304 = 9 * 2^8, 2560 = 5 * 2^9,
    4608 = 9 * 2^9 and 18432 = 9 * 2^11 cost no more per point than powers of two
    (NOTES.md). Allowing them keeps the padding of 2L - 1 well under 2x: e.g. 4608 instead
    of 8192 for a 48 x 48 latent.
    """
    target = max(1, min_length)
    sizes = []
    for odd in FFT_ODD_FACTORS:
        size = odd
        while size < target:
            size *= 2
        sizes.append(size)
    return min(sizes)


def _rows_fft(transform, rows: jax.Array, n_fft: int) -> jax.Array:
    """`transform` (rfft / irfft) of each row of a 2-D array.

    XLA:CPU's FFT needs its operand in row-major layout. On a 3-D operand produced by a
    transpose, layout assignment in a sharded (SPMD) program can pick another layout and the
    FFT fails a RET_CHECK in fft_thunk (seen with the batch split over 8 devices); flattening
    to rows first keeps the operand row-major (tests/test_training.py covers the sharded case).
    """
    return transform(rows, n=n_fft)


def _last_axis_fft(transform, x: jax.Array, n_fft: int) -> jax.Array:
    """`transform` along the last axis of (..., T), computed on 2-D rows (see `_rows_fft`)."""
    out = _rows_fft(transform, x.reshape(-1, x.shape[-1]), n_fft)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _keep_leading_axes(sharding, rank: int):
    """The operand's sharding if its last axis is whole on each device, else replicated.

    The partitioner hands over its own (GSPMD) sharding: the leading axes may be split in any
    way the mesh allows, which this keeps. The last axis (time or frequency) is never split
    by the model; should it be, the operand is gathered, which is always correct.
    """
    hlo = sharding._to_xla_hlo_sharding(rank)
    if hlo.is_replicated() or hlo.tile_assignment_dimensions()[rank - 1] == 1:
        return sharding
    return jax.sharding.GSPMDSharding.get_replicated(sharding._device_assignment)


@functools.cache
def _partitioned_transform(kind: str, n_fft: int, in_length: int, in_dtype: str):
    """A per-row transform along the last axis that the SPMD partitioner keeps sharded.

    XLA's partitioner has no rule for FFTs with sharded batch axes: it all-gathers the operand
    and every device transforms the whole global batch (with the batch over 8 devices, each
    one held and transformed all 8 devices' rows: 8x the FFT work, memory growing with the
    global batch). Rows are independent, so this op keeps the leading axes' sharding and
    transforms each device's own rows (`custom_partitioning`); its gradient is the linear
    transpose, applied the same way.

    kind: "rfft" or "irfft"; n_fft: the transform length; in_length, in_dtype: the last axis
    and dtype of the operand (needed for the transpose).
    """
    from jax.experimental.custom_partitioning import custom_partitioning

    transform = {"rfft": jnp.fft.rfft, "irfft": jnp.fft.irfft}[kind]

    def forward_local(x):
        return _last_axis_fft(transform, x, n_fft)

    def transpose_local(g):
        primal = jax.ShapeDtypeStruct((*g.shape[:-1], in_length), jnp.dtype(in_dtype))
        return jax.linear_transpose(forward_local, primal)(g)[0]

    def partitioned(fn):
        op = custom_partitioning(fn)

        def infer(mesh, arg_shapes, result_shape):
            del mesh, result_shape
            return _keep_leading_axes(arg_shapes[0].sharding, len(arg_shapes[0].shape))

        def partition(mesh, arg_shapes, result_shape):
            del result_shape
            sharding = _keep_leading_axes(arg_shapes[0].sharding, len(arg_shapes[0].shape))
            return mesh, fn, sharding, (sharding,)

        op.def_partition(
            infer_sharding_from_operands=infer,
            partition=partition,
            decode_shardings=False,  # the partitioner's own shardings, whatever the mesh
            sharding_rule="... i -> ... j",
            need_replication_factors=("i", "j"),
        )
        return op

    forward_op, transpose_op = partitioned(forward_local), partitioned(transpose_local)

    @jax.custom_vjp
    def apply(x):
        return forward_op(x)

    apply.defvjp(lambda x: (forward_op(x), None), lambda _, g: (transpose_op(g),))
    return apply


def batched_fft(kind: str, x: jax.Array, n_fft: int) -> jax.Array:
    """ "rfft" or "irfft" (`kind`) of length n_fft along the last axis of x (..., T), with the
    leading axes' sharding kept (see `_partitioned_transform`)."""
    return _partitioned_transform(kind, n_fft, x.shape[-1], jnp.dtype(x.dtype).name)(x)
