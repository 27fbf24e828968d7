"""DiT-S/2 train steps with JAX's attention derivative against the hand-written one.

    python scripts/attention_ab.py        # batch 8, 32x32x4, float32; about 2 minutes

Both steps are built in one process (the same step as scripts/cpu_peer_bench.py) and timed
in interleaved rounds, so the machine's load falls on both alike.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cpu_peer_bench


def main(rounds: int = 5, calls: int = 2) -> None:
    steps = {
        implementation: cpu_peer_bench.jax_step(
            "DiT-S/2", 8, 32, 4, False, attention=implementation
        )
        for implementation in ("xla", "custom_vjp")
    }
    cpu_peer_bench.print_ab_table(
        "attention", cpu_peer_bench.interleaved_times(steps, rounds, calls)
    )


if __name__ == "__main__":
    main()
