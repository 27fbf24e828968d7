"""Three layout changes to the DiffuSSM block, each timed against the block as it is.

    python scripts/layout_ab.py                          # all three; about 6 minutes
    python scripts/layout_ab.py --experiments=polyphase --check   # float64 equality only

On the step of launch.benchmark's throughput mode (D = 256, depth 2, L = 1024, batch 8,
float32; AdamW as scripts/cpu_peer_bench.py), built in one process and timed in interleaved
rounds:

  fused_w0_w1   W0 and W1 read the same modulated tokens: one (D, 3D) matmul instead of two,
                the parameters unchanged (their kernels concatenated at call time).
  ssm_no_remat  the fft backend without its `jax.checkpoint`: the kernel spectra and u's are
                stored for the backward pass instead of recomputed (more memory).
  polyphase     the hourglass segment Wup -> SSM -> Wdown computed channel-major, with the
                FFT convolution split into the M sub-positions' polyphase components, so that
                no (B, L, D) <-> (B, D, L) transpose is written in the program. Timed as the
                segment's forward and backward alone, and the activation-sized copies XLA
                compiles into each version are counted (`hlo_stats.layout_ops`).

The results are in docs/benchmarks ("CPU proxies, 2026-12-07, second host").
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cpu_peer_bench

EXPERIMENTS = ("fused_w0_w1", "ssm_no_remat", "polyphase")
WIDTH, DEPTH, SIDE, BATCH = 256, 2, 32, 8


def fused_w0_w1_block():
    """DiffuSSMBlock with W0 and W1 applied as one matmul (same parameter tree)."""
    import flax.linen as nn
    import jax.numpy as jnp

    from diffussm_jax.models import diffussm, layers

    class KernelAndBias(nn.Module):
        """The parameters `layers.Dense` makes, returned instead of applied."""

        features: int
        in_features: int
        axes: tuple = ("embed", "hidden")
        param_dtype: object = jnp.float32

        @nn.compact
        def __call__(self):
            init = layers.partitioned(layers.xavier_uniform, self.axes)
            kernel = self.param("kernel", init, (self.in_features, self.features), self.param_dtype)
            bias_init = layers.partitioned(layers.zeros, self.axes[1:])
            return kernel, self.param("bias", bias_init, (self.features,), self.param_dtype)

    class FusedBlock(diffussm.DiffuSSMBlock):
        @nn.compact
        def __call__(self, x, c):
            batch, short_len, width = x.shape
            ratio, act = self.hourglass_ratio, layers.activation_fn(self.activation)
            kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
            shift, scale, gate = layers.AdaLNModulation(3, width, name="adaLN_modulation", **kw)(c)
            x_mod = layers.modulate(layers.layer_norm(x), shift, scale)
            k0, b0 = KernelAndBias(width, width, name="W0")()
            k1, b1 = KernelAndBias(2 * width, width, name="W1")()
            both = layers.dense_dot(x_mod, jnp.concatenate([k0, k1], 1))
            both = act(both + jnp.concatenate([b0, b1]))
            h0, gate_branch = both[..., :width], both[..., width:]
            up = diffussm.SubpositionDense(ratio, width, shared_input=True, name="Wup", **kw)
            u = act(up(h0)).reshape(batch, short_len * ratio, width)
            y = diffussm.ssm.BidirectionalSSM(
                width, self.ssm, channels_first=True, dtype=self.ssm_dtype, name="ssm"
            )(u)
            y = y.reshape(batch, 2 * width, short_len, ratio).transpose(3, 0, 2, 1)
            down = diffussm.SubpositionDense(ratio, 2 * width // ratio, name="Wdown", **kw)
            x_short = act(down(y)).transpose(1, 2, 0, 3).reshape(batch, short_len, 2 * width)
            value = act(
                layers.Dense(2 * width, axes=("hidden", "hidden_out"), name="W2", **kw)(x_short)
            )
            out = layers.Dense(width, axes=("hidden", "embed"), name="W3", **kw)(
                value * gate_branch
            )
            return (x + gate[:, None, :] * out).astype(x.dtype)

    return FusedBlock


def model_steps(experiment: str) -> dict:
    """{"as is": step, experiment: step} for the two block-level experiments."""
    from diffussm_jax.models import diffussm
    from diffussm_jax.ssm import backends

    original_block, original_fft = diffussm.DiffuSSMBlock, backends._fft_bidirectional
    steps = {}
    for form in ("as is", experiment):
        if form == "fused_w0_w1":
            diffussm.DiffuSSMBlock = fused_w0_w1_block()  # looked up when the model is traced
        if form == "ssm_no_remat":
            backends._fft_bidirectional = original_fft.__wrapped__
        try:
            steps[form] = cpu_peer_bench.jax_step(
                "DiffuSSM-S", BATCH, SIDE, 4, False, hidden_size=WIDTH, depth=DEPTH
            )
            steps[form]()  # trace and compile with this form
        finally:
            diffussm.DiffuSSMBlock, backends._fft_bidirectional = original_block, original_fft
    return steps


# ------------------------------------------------------------------------------ polyphase


def polyphase_bidirectional(u_poly, both):
    """`backends._fft_bidirectional` on polyphase, channel-major data.

    u_poly (M, H, B, J) with u[b, j M + m, h] = u_poly[m, h, b, j] -> (M, 2H, B, J), the same
    for y. With n = fft_size(2L - 1) = M P, the n-point spectrum is assembled from the M
    P-point spectra of the components, U[k] = sum_m w^(-m k) U_m[k mod P] (w = e^(2 pi i / n)),
    multiplied by the kernels' spectra, and folded back into P-point spectra of y's components,
    Y_m[k] = (1/M) sum_r Y[k + r P] w^(m (k + r P)), whose irffts are the components. Every
    index range is a static slice or reversed slice of a half spectrum.
    """
    import jax.numpy as jnp

    from diffussm_jax.ssm.kernels import s4d_kernel
    from diffussm_jax.ssm.transforms import fft_size

    ratio, channels, _, short_len = u_poly.shape
    length = ratio * short_len
    n_fft = fft_size(2 * length - 1)
    if n_fft % (2 * ratio):
        raise ValueError(f"fft size {n_fft} is not a multiple of 2 M = {2 * ratio}")
    period, bins = n_fft // ratio, n_fft // 2 + 1
    dtype = jnp.promote_types(u_poly.dtype, jnp.float32)
    cdtype = jnp.result_type(dtype, jnp.complex64)

    kernels = s4d_kernel(*both[:3], length).astype(dtype)
    kernels = kernels.at[:, 0].add(both[3].astype(dtype))
    kernels_f = jnp.fft.rfft(kernels, n=n_fft).reshape(2, channels, 1, -1)
    kernels_f = jnp.concatenate([kernels_f[:1], jnp.conj(kernels_f[1:])])  # (2, H, 1, F)

    def full_period(half, start, stop):
        """Bins start..stop-1 (mod P) of the P-point spectra whose halves (P/2 + 1) are given."""
        pieces, k = [], start
        while k < stop:
            t = k % period
            if t <= period // 2:
                end = min(stop - k, period // 2 + 1 - t)
                pieces.append(half[..., t : t + end])
            else:
                end = min(stop - k, period - t)
                pieces.append(
                    jnp.conj(jnp.flip(half[..., period - t - end + 1 : period - t + 1], -1))
                )
            k += end
        return jnp.concatenate(pieces, -1)

    u_half = jnp.fft.rfft(u_poly.astype(dtype), n=period)  # (M, H, B, P/2 + 1)
    k = np.arange(bins)
    twiddle = np.exp(-2j * np.pi * np.arange(ratio)[:, None, None, None] * k / n_fft)
    u_f = jnp.sum(full_period(u_half, 0, bins) * jnp.asarray(twiddle, cdtype), 0)  # (H, B, F)
    y_f = (u_f * kernels_f).reshape(2 * channels, u_f.shape[1], bins)  # (2H, B, F)

    def spectrum(start, stop):  # Y[start..stop-1] of the real n-point signal
        if stop <= bins:
            return y_f[..., start:stop]
        return jnp.conj(jnp.flip(y_f[..., n_fft - stop + 1 : n_fft - start + 1], -1))

    half = period // 2 + 1
    folded = []
    for m in range(ratio):
        terms = []
        for r in range(ratio):
            k = np.arange(half) + r * period
            phase = np.exp(2j * np.pi * m * k / n_fft) / ratio
            terms.append(spectrum(r * period, r * period + half) * jnp.asarray(phase, cdtype))
        folded.append(sum(terms))
    return jnp.fft.irfft(jnp.stack(folded), n=period)[..., :short_len]  # (M, 2H, B, J)


def segments(dtype):
    """(as is, polyphase): h0 (B, J, D), wup (D, M, D), wdown (M, 2D, 2D/M), SSM parameters
    of both directions -> Wdown's activated output (B, J, 2D)."""
    import jax
    import jax.numpy as jnp

    from diffussm_jax.ssm import backends
    from diffussm_jax.ssm.transforms import fft_size

    def as_is(h0, wup, wdown, both):
        batch, short_len, width = h0.shape
        ratio = wup.shape[1]
        u = jax.nn.gelu(jnp.dot(h0.reshape(-1, width), wup.reshape(width, -1)))
        u = u.reshape(batch, short_len * ratio, width)
        y = backends._fft_bidirectional(u, both, fft_size(2 * u.shape[1] - 1), dtype)
        y = y.reshape(batch, 2 * width, short_len, ratio).transpose(3, 0, 2, 1)
        x = jax.nn.gelu(jnp.einsum("m...i,mio->m...o", y, wdown))
        return x.transpose(1, 2, 0, 3).reshape(batch, short_len, 2 * width)

    def polyphase(h0, wup, wdown, both):
        batch, short_len, width = h0.shape
        u = jax.nn.gelu(jnp.einsum("imd,bji->mdbj", wup, h0))  # (M, D, B, J)
        y = jax.checkpoint(polyphase_bidirectional)(u, both)  # (M, 2D, B, J)
        x = jax.nn.gelu(jnp.einsum("mcbj,mco->bjmo", y, wdown))
        return x.reshape(batch, short_len, 2 * width)

    return as_is, polyphase


def segment_inputs(width, ratio, short_len, batch, state, dtype):
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(0), 5)
    cdtype = jnp.result_type(dtype, jnp.complex64)
    h0 = jax.random.normal(keys[0], (batch, short_len, width), dtype)
    wup = jax.random.normal(keys[1], (width, ratio, width), dtype) / np.sqrt(width)
    wdown = jax.random.normal(keys[2], (ratio, 2 * width, 2 * width // ratio), dtype)
    log_dt = jnp.log(jnp.linspace(1e-3, 1e-1, 2 * width)).astype(dtype)
    a = (-0.5 + 1j * np.pi * np.arange(state)) * jnp.ones((2 * width, 1))
    c = jax.random.normal(keys[3], (2 * width, state)) + 1j * jax.random.normal(keys[4], a.shape)
    both = (log_dt, a.astype(cdtype), c.astype(cdtype), jnp.ones(2 * width, dtype))
    return h0, wup, wdown / np.sqrt(2 * width), both


def check_polyphase() -> float:
    """Largest difference of output and gradients between the two segments, float64."""
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    h0, wup, wdown, both = segment_inputs(8, 2, 24, 3, 4, jnp.float64)
    as_is, polyphase = segments(jnp.float64)
    errors = [
        float(jnp.max(jnp.abs(as_is(h0, wup, wdown, both) - polyphase(h0, wup, wdown, both))))
    ]
    grads = [
        jax.grad(lambda h, w1, w2, s=s: jnp.sum(jnp.sin(s(h, w1, w2, both))), (0, 1, 2))(
            h0, wup, wdown
        )
        for s in (as_is, polyphase)
    ]
    errors += [float(jnp.max(jnp.abs(a - b))) for a, b in zip(*grads, strict=True)]
    return max(errors)


def polyphase_times(rounds: int) -> None:
    import jax
    import jax.numpy as jnp

    from diffussm_jax import hlo_stats

    inputs = segment_inputs(WIDTH, 2, SIDE * SIDE // 2, BATCH, 32, jnp.float32)
    h0, wup, wdown, both = inputs
    steps, copies = {}, {}
    for name, segment in zip(("as is", "polyphase"), segments(jnp.float32), strict=True):
        grad = jax.jit(
            jax.grad(lambda h, w1, w2, s=segment: jnp.sum(s(h, w1, w2, both) ** 2), (0, 1, 2))
        )
        hlo = grad.lower(h0, wup, wdown).compile().as_text()
        ops = hlo_stats.layout_ops(hlo, min_elements=h0.size)  # activation-sized
        copies[name] = sum(op.opcode == "copy" for op in ops)
        steps[name] = lambda g=grad: jax.block_until_ready(g(h0, wup, wdown))
        steps[name]()
    times = cpu_peer_bench.interleaved_times(steps, rounds, 2)
    cpu_peer_bench.print_ab_table("Wup -> SSM -> Wdown, forward + backward", times)
    print(
        "activation-sized copies in the compiled segment: "
        + ", ".join(f"{k} {v}" for k, v in copies.items())
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiments", default=",".join(EXPERIMENTS))
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--check", action="store_true", help="only the float64 polyphase check")
    args = parser.parse_args()
    chosen = args.experiments.split(",")
    unknown = sorted(set(chosen) - set(EXPERIMENTS))
    if unknown:
        parser.error(f"unknown experiments {unknown}; choose from {', '.join(EXPERIMENTS)}")
    if args.check:
        error = check_polyphase()
        print(f"polyphase segment vs as is, float64: largest difference {error:.2e}")
        sys.exit(0 if error < 1e-10 else 1)

    from diffussm_jax.parallel import host_allocator

    host_allocator.retain_freed_memory()
    print(f"load {os.getloadavg()[0]:.2f}; host malloc: {host_allocator.describe()}")
    for experiment in chosen:
        print(f"\n{experiment}")
        if experiment == "polyphase":
            polyphase_times(args.rounds)
            continue
        start = time.perf_counter()
        steps = model_steps(experiment)
        cpu_peer_bench.print_ab_table(
            experiment, cpu_peer_bench.interleaved_times(steps, args.rounds, 2)
        )
        print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
