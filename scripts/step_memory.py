"""Temporary memory of the train step, split into a per-example slope and an intercept.

The trainer's own train step (AdamW, EMA, non-finite guard) is compiled ahead of time on fake
CPU devices with abstract inputs (nothing is allocated), at two per-device batch sizes, and XLA's
memory analysis gives the temporaries: slope = their growth per example on a device, intercept =
what is left at zero examples (the part that does not shrink with the batch).

    python scripts/step_memory.py --depth=4 --resolution=512 --remat=full --layouts=1x1,8x1,1x8

Layouts are data x fsdp; each compiles in its own process with that many fake devices. `--depth`
trims the model to fewer layers so that the compile takes seconds; the per-layer parts scale
with the depth. The FLOPs column is XLA's count for one device's program at the larger batch:
the per-device batch is the same in every layout, so a layout whose figure is well above the
1 x 1 one makes its devices compute other devices' examples. The last column counts XLA's
"involuntary full rematerialization" warnings (a tensor gathered to be re-split) in both
compiles.

    python scripts/step_memory.py --depth=2 --resolution=256 --layouts=1x1 --time_steps=3

`--time_steps=N` also runs the step at the larger batch N times on this machine (after one
warm-up call, with random latents) and reports the median seconds per step: the price of a
remat policy in time beside its memory. It needs the real train state in memory, so it is
for trimmed models (`--depth`) and one device (layout 1 x 1).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 2**30


def measure(model, depth, resolution, data, fsdp, per_device_batch, remat, time_steps=0) -> dict:
    """One compile in this process (the fake devices are already set); with time_steps, the
    median time of that many calls after a warm-up."""
    import jax
    import numpy as np

    sys.path.insert(0, REPO)
    from configs import imagenet256
    from diffussm_jax import parallel, training
    from diffussm_jax.benchmarks import measure as measure_calls
    from diffussm_jax.training import train_step

    devices = data * fsdp
    global_batch = per_device_batch * devices
    config = imagenet256.get_config(f"model={model},batch={global_batch}", resolution=resolution)
    config.mesh.data, config.mesh.fsdp = data, fsdp
    config.model.remat = remat
    config.model.depth = depth
    mesh = parallel.create_mesh(data, fsdp, jax.devices()[:devices])
    experiment = training.setup(config, mesh)
    batch = train_step.abstract_batch(config, mesh, global_batch)
    compiled = experiment.train_step().lower(experiment.abstract_state, batch).compile()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    result = {"temp": memory.temp_size_in_bytes, "flops": float(cost.get("flops", 0.0))}
    if time_steps:
        rng = np.random.default_rng(0)
        inputs = {
            name: jax.device_put(
                rng.normal(size=spec.shape).astype(spec.dtype)
                if name == "image"
                else rng.integers(0, max(config.data.num_classes, 1), spec.shape).astype(
                    spec.dtype
                ),
                spec.sharding,
            )
            for name, spec in batch.items()
        }
        state = experiment.init_state()

        def step():  # the state is donated, so each call continues from the last one's
            nonlocal state
            state, metrics = compiled(state, inputs)
            return metrics

        timing = measure_calls.time_calls(step, (), repeats=time_steps)
        result["seconds"] = timing["median_seconds"]
    return result


def run_layout(args, data: int, fsdp: int) -> dict:
    """Both batch sizes of one layout, each in a subprocess with data x fsdp fake devices."""
    results = []
    for per_device_batch in args.batches:
        spec = dict(
            model=args.model,
            depth=args.depth,
            resolution=args.resolution,
            data=data,
            fsdp=fsdp,
            per_device_batch=per_device_batch,
            remat=args.remat,
            time_steps=args.time_steps if per_device_batch == args.batches[-1] else 0,
        )
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={data * fsdp}"
        done = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(spec)],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        result = json.loads(done.stdout.strip().splitlines()[-1])
        # XLA's warning when it all-gathers a tensor to re-split it another way.
        result["regathers"] = done.stderr.count("Involuntary full rematerialization")
        results.append(result)
    (b1, b2), (m1, m2) = args.batches, results
    slope = (m2["temp"] - m1["temp"]) / (b2 - b1)
    return {
        "layout": f"{data} x {fsdp}",
        "temp_small": m1["temp"] / GiB,
        "temp_large": m2["temp"] / GiB,
        "slope": slope / GiB,
        "intercept": (m1["temp"] - slope * b1) / GiB,
        "flops": m2["flops"],
        "regathers": m1["regathers"] + m2["regathers"],
        "seconds": m2.get("seconds"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="DiffuSSM-XL")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument(
        "--remat", default="none", help="none | full | save_matmuls | ssm_only (see the models)"
    )
    parser.add_argument("--layouts", default="1x1,8x1,1x8", help="data x fsdp, comma-separated")
    parser.add_argument("--batches", default="1,2", help="two per-device batch sizes")
    parser.add_argument(
        "--time_steps",
        type=int,
        default=0,
        help="also time this many steps at the larger batch (layout 1x1 only; module doc)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(**json.loads(args.worker))))
        return
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.time_steps and args.layouts != "1x1":
        parser.error("--time_steps runs the step for real: use it with --layouts=1x1")
    sys.path.insert(0, REPO)
    from diffussm_jax.parallel import host_allocator

    host_allocator.retain_freed_memory()  # the workers inherit it (timed steps: docs/benchmarks)
    print(
        f"{args.model}, depth {args.depth}, {args.resolution} px, remat {args.remat}, "
        f"per-device batch {args.batches[0]} and {args.batches[1]}:\n"
    )
    print(
        "| data x fsdp | temp GiB (small batch) | temp GiB (large) | GiB per example "
        "| intercept GiB | TFLOP per device (large) | regather warnings |"
        + (" s/step (large) |" if args.time_steps else "")
    )
    print("|---|---|---|---|---|---|---|" + ("---|" if args.time_steps else ""))
    for layout in args.layouts.split(","):
        data, fsdp = (int(x) for x in layout.split("x"))
        row = run_layout(args, data, fsdp)
        print(
            f"| {row['layout']} | {row['temp_small']:.2f} | {row['temp_large']:.2f} | "
            f"{row['slope']:.3f} | {row['intercept']:.2f} | {row['flops'] / 1e12:.2f} | "
            f"{row['regathers']} |" + (f" {row['seconds']:.3f} |" if args.time_steps else ""),
            flush=True,
        )


if __name__ == "__main__":
    main()
