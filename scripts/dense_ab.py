"""Train steps with dense layers as one 2-D matmul (`layers.dense_dot`) against the einsum
over the input's leading axes that they were before.

    python scripts/dense_ab.py                      # DiT-S/2 and DiffuSSM-S; about 6 minutes
    python scripts/dense_ab.py --models=DiT-S/2

Batch 8, 32x32x4 latents, float32: the step of scripts/cpu_peer_bench.py. Both forms of each
model are built in one process and timed in interleaved rounds.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cpu_peer_bench


def einsum_dot(x, kernel):
    """The contraction as `jnp.einsum` writes it, the leading axes of x kept free."""
    import jax.numpy as jnp

    return jnp.einsum(
        x, [..., 0], kernel, [0, *range(1, kernel.ndim)], [..., *range(1, kernel.ndim)]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="DiT-S/2,DiffuSSM-S")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--calls", type=int, default=2)
    args = parser.parse_args()

    from diffussm_jax.models import layers

    folded = layers.dense_dot
    for name in args.models.split(","):
        steps = {}
        for form, dot in (("einsum", einsum_dot), ("2-D dense_dot", folded)):
            layers.dense_dot = dot  # looked up at trace time by Dense and Wup
            steps[form] = cpu_peer_bench.jax_step(name, 8, 32, 4, False)
            steps[form]()  # trace and compile with this form
        layers.dense_dot = folded
        print(f"\n{name}")
        cpu_peer_bench.print_ab_table(
            "dense layers", cpu_peer_bench.interleaved_times(steps, args.rounds, args.calls)
        )


if __name__ == "__main__":
    main()
