"""DiT-S/2 train steps with JAX's attention derivative against the hand-written one.

    python scripts/attention_ab.py        # batch 8, 32x32x4, float32; about 2 minutes

Both steps are built in one process (the same step as scripts/cpu_peer_bench.py) and timed
in interleaved rounds, so the machine's load falls on both alike.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cpu_peer_bench


def main(rounds: int = 5, calls: int = 2) -> None:
    steps = {}
    for implementation in ("xla", "custom_vjp"):
        step = cpu_peer_bench.jax_step("DiT-S/2", 8, 32, 4, False, attention=implementation)
        step()  # compile
        steps[implementation] = step
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(calls):
                step()
            times[name].append((time.perf_counter() - start) / calls)
    print("| attention | s/step (median) | range |\n|---|---|---|")
    for name, seconds in times.items():
        seconds.sort()
        print(f"| {name} | {seconds[len(seconds) // 2]:.3f} | {seconds[0]:.3f}-{seconds[-1]:.3f} |")


if __name__ == "__main__":
    main()
