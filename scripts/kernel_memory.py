"""Peak temporary memory of S4D kernel generation at D=1152, N=64, L=4096 (compiled, abstract).

python scripts/kernel_memory.py
"""

import jax
import jax.numpy as jnp

from diffussm_jax import ssm

CHANNELS, STATE, LENGTH = 1152, 64, 4096


def main() -> None:
    args = (
        jax.ShapeDtypeStruct((CHANNELS,), jnp.float32),
        jax.ShapeDtypeStruct((CHANNELS, STATE // 2), jnp.complex64),
        jax.ShapeDtypeStruct((CHANNELS, STATE // 2), jnp.complex64),
    )
    print("| kernel step | temp forward (MiB) | temp forward + backward (MiB) |")
    print("|---|---|---|")
    for name, kernel_fn in (("naive", ssm.vandermonde_kernel), ("ours", ssm.s4d_kernel)):

        def forward(*params, kernel_fn=kernel_fn):
            return kernel_fn(*params, LENGTH)

        def loss(*params, forward=forward):
            return forward(*params).sum()

        fwd = jax.jit(forward).lower(*args).compile().memory_analysis()
        bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile().memory_analysis()
        mib = [analysis.temp_size_in_bytes / 2**20 for analysis in (fwd, bwd)]
        print(f"| {name} | {mib[0]:.1f} | {mib[1]:.1f} |")


if __name__ == "__main__":
    main()
