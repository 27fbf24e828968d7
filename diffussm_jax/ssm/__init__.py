"""Diagonal state space layers (S4D), with three interchangeable ways to apply them.

The math is a set of pure functions of arrays, so it can be checked against float64 references:

  s4d_eigenvalues       A's N/2 complex modes for the Lin / Inv / LegS initialisations
  discretize_zoh        zero-order hold: (dt, A) -> (dA, dB)
  vandermonde_kernel    K[h, l] = 2 Re sum_n C[h,n] dB[h,n] dA[h,n]^l by explicit powers (H, N/2, L)
  s4d_kernel            the same K without the (H, N/2, L) tensor: powers factored into two short
                        Vandermondes, so the sum over modes is a small matmul per channel
  fft_causal_conv       y = irfft(rfft(u, n) * rfft(K, n))[:L], n >= 2L - 1 a fast FFT length
  scan_causal_ssm       the recurrence x_l = dA x_{l-1} + dB u_l as a parallel associative scan
  chunked_causal_ssm    chunks of T steps: a (T, T) Toeplitz matmul inside each chunk, the N/2
                        complex state carried between chunks by matmuls and a scan over L/T chunks
  causal_ssm            y = SSM(u) + D u with the backend `SSMSettings` picks (fft | scan | chunked)
  bidirectional_ssm     [causal SSM(u), anti-causal SSM'(u)]; the fft backend shares one rfft(u)
  direct_causal_conv    the O(L^2) sum, for tests
  s4d_recurrence        the SSM run as an RNN (sequential scan), for tests

All backends compute in float32/complex64 whatever the activation dtype (float64 inputs stay
float64, for tests); only the chunked backend's matmul operands follow bfloat16 activations, with
float32 accumulation. Costs per (example, position, channel): fft ~ a few log2(2L) flops in FFTs;
scan ~ 6 N real flops, memory-bound over a (B, L, H, N/2) complex tensor; chunked T + 2N MACs, all
in dense matmuls.

`S4D` and `BidirectionalSSM` are thin Linen layers that own the parameters. The kernel
depends only on the parameters, so it is generated once per call, not per example.

`SSMSettings` holds what configures an SSM (state size, initialisation, step-size range, backend,
chunk length); the models take it as one field and hand it down unchanged to the layers and to
`causal_ssm` / `bidirectional_ssm`.

Where each part lives:

  settings.py    SSMSettings, SSMParams, the names of the inits and backends
  kernels.py     initialisation, ZOH, kernel generation (the Vandermonde and the factored one)
  transforms.py  FFT lengths and the sharding-preserving rfft / irfft
  backends.py    fft, scan and chunked application; causal_ssm, bidirectional_ssm
  references.py  the direct convolution and the recurrence, for tests
  layers.py      the Linen layers S4D and BidirectionalSSM
"""

from diffussm_jax.ssm.backends import (
    SCAN_STATE_ELEMENTS,
    bidirectional_ssm,
    causal_ssm,
    chunked_causal_ssm,
    fft_causal_conv,
    scan_causal_ssm,
)
from diffussm_jax.ssm.kernels import (
    KERNEL_CHUNK_ELEMENTS,
    discretize_zoh,
    hippo_legs_normal_eigenvalues,
    log_dt_init,
    s4d_eigenvalues,
    s4d_kernel,
    vandermonde_kernel,
)
from diffussm_jax.ssm.layers import S4D, SSM_DYNAMICS_PARAMS, BidirectionalSSM
from diffussm_jax.ssm.references import direct_causal_conv, s4d_recurrence
from diffussm_jax.ssm.settings import (
    BACKENDS,
    DEFAULT_CHUNK_SIZE,
    INITS,
    Backend,
    InitName,
    SSMParams,
    SSMSettings,
)
from diffussm_jax.ssm.transforms import FFT_ODD_FACTORS, batched_fft, fft_size

__all__ = [
    "BACKENDS",
    "DEFAULT_CHUNK_SIZE",
    "FFT_ODD_FACTORS",
    "INITS",
    "KERNEL_CHUNK_ELEMENTS",
    "S4D",
    "SCAN_STATE_ELEMENTS",
    "SSM_DYNAMICS_PARAMS",
    "Backend",
    "BidirectionalSSM",
    "InitName",
    "SSMParams",
    "SSMSettings",
    "batched_fft",
    "bidirectional_ssm",
    "causal_ssm",
    "chunked_causal_ssm",
    "direct_causal_conv",
    "discretize_zoh",
    "fft_causal_conv",
    "fft_size",
    "hippo_legs_normal_eigenvalues",
    "log_dt_init",
    "s4d_eigenvalues",
    "s4d_kernel",
    "s4d_recurrence",
    "scan_causal_ssm",
    "vandermonde_kernel",
]
