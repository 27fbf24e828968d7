"""Pod-scale memory plan without a pod: per-device state bytes and ahead-of-time compiled memory.

For each device count the script starts one subprocess with that many fake CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=N), builds the ImageNet config of each model and
resolution, and for each mesh layout (data x fsdp):

  * state: bytes of params + EMA + AdamW moments held by one device, from the shardings alone;
  * compiled: the train step lowered and compiled with abstract inputs only (ShapeDtypeStructs
    carrying the shardings; nothing is allocated) and XLA's memory analysis of that executable:
    arguments (state + batch shard), outputs, aliased (donated) bytes and temporaries.

    python scripts/pod_memory.py --mode=compile --devices=64,256 --out=docs/pod_memory.md
    python scripts/pod_memory.py --mode=state --devices=8 --fsdp=1,2,4,8 --models=DiffuSSM-XL
    python scripts/pod_memory.py --mode=calibrate --devices=1 --global_batch=16 \
        --models=DiffuSSM-XL --resolutions=256      # vs the 45.9 GiB measured on one H100

The compile runs on the CPU backend: argument/output/alias bytes are exact for any backend (they
follow from shapes and shardings); temporaries are XLA:CPU's buffer assignment, which fuses less
than the TPU/GPU compilers and keeps bf16 elementwise work in f32, so treat them as an estimate
(usually on the high side) of what an accelerator needs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 2**30
BUDGETS = {"TPU 16 GiB": 16 * GiB, "H100 80 GB": 80 * 10**9}


def _row(model, resolution, data, fsdp, global_batch, mode, remat) -> dict:
    """Measures one (model, resolution, layout) in this process (fake devices already set)."""
    import jax

    from configs import imagenet256
    from diffussm_jax import parallel, training
    from diffussm_jax.training import train_step

    config = imagenet256.get_config(f"model={model},batch={global_batch}", resolution=resolution)
    config.mesh.data, config.mesh.fsdp = data, fsdp
    config.model.remat = remat
    mesh = parallel.create_mesh(data, fsdp)
    parallel.check_global_batch(config.global_batch_size, mesh)
    experiment = training.setup(config, mesh)
    abstract = experiment.abstract_state
    row = {
        "model": model,
        "resolution": resolution,
        "devices": mesh.devices.size,
        "data": data,
        "fsdp": fsdp,
        "per_device_batch": global_batch // mesh.devices.size,
        "remat": remat,
        "params_m": sum(x.size for x in jax.tree.leaves(abstract.params)) / 1e6,
        "state_bytes": parallel.bytes_per_device(abstract),
        "params_bytes": parallel.bytes_per_device(abstract.params),
        "ema_bytes": parallel.bytes_per_device(abstract.ema_params),
        "opt_bytes": parallel.bytes_per_device(abstract.opt_state),
    }
    if mode == "state":
        return row
    batch = train_step.abstract_batch(config, mesh, global_batch)
    step = experiment.train_step()
    start = time.perf_counter()
    compiled = step.lower(abstract, batch).compile()
    analysis = compiled.memory_analysis()
    row.update(
        compile_s=round(time.perf_counter() - start, 1),
        argument_bytes=analysis.argument_size_in_bytes,
        output_bytes=analysis.output_size_in_bytes,
        alias_bytes=analysis.alias_size_in_bytes,
        temp_bytes=analysis.temp_size_in_bytes,
    )
    # Live at the peak: inputs, the step's temporaries, and outputs that do not reuse a donated
    # input buffer.
    row["total_bytes"] = (
        row["argument_bytes"] + row["temp_bytes"] + (row["output_bytes"] - row["alias_bytes"])
    )
    return row


def calibration_row(model: str, resolution: int, batch: int) -> dict:
    """The benchmark's train step (params + Adam, MSE, no EMA, no remat) on one device.

    `launch.benchmark` compiled exactly this step on one H100 (docs/benchmarks/README.md, "On
    one H100"), so the ratio of the two compiled peaks says how far XLA:CPU's memory analysis is
    from the GPU compiler's for the same program.
    """
    import jax
    import jax.numpy as jnp
    import optax

    from diffussm_jax import models
    from diffussm_jax.benchmarks import steps
    from diffussm_jax.training import train_state

    net = models.create(
        model,
        input_size=resolution // 8,
        in_channels=4,
        num_classes=1000,
        dtype=jnp.bfloat16,
        scan_layers=True,
    )
    params = jax.eval_shape(lambda: train_state.init_variables(net, jax.random.key(0)))
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nn_unbox(params))
    tx = optax.adam(1e-4)
    opt_state = jax.eval_shape(tx.init, params)
    x, t, y, target = steps.example_batch(net, batch)
    step = jax.jit(steps.train_step_fn(net, tx), donate_argnums=(0, 1))
    analysis = step.lower(params, opt_state, x, t, y, target).compile().memory_analysis()
    peak = (
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        - analysis.alias_size_in_bytes
        + analysis.temp_size_in_bytes
    )
    return {
        "model": model,
        "resolution": resolution,
        "batch": batch,
        "peak_gib": peak / GiB,
        "argument_gib": analysis.argument_size_in_bytes / GiB,
        "temp_gib": analysis.temp_size_in_bytes / GiB,
    }


def nn_unbox(tree):
    import flax.linen as nn

    return nn.meta.unbox(tree)


def worker(args) -> None:
    """Runs in a subprocess with `--devices` fake CPU devices; prints one JSON line per row."""
    import jax

    devices = jax.device_count()
    if args.mode == "calibrate":
        for model in args.models.split(","):
            for resolution in map(int, args.resolutions.split(",")):
                row = calibration_row(model, resolution, args.global_batch)
                print(json.dumps(row), flush=True)
        return
    for model in args.models.split(","):
        for resolution in map(int, args.resolutions.split(",")):
            for fsdp in map(int, args.fsdp.split(",")):
                if fsdp > devices or devices % fsdp:
                    continue
                row = _row(
                    model,
                    resolution,
                    devices // fsdp,
                    fsdp,
                    args.global_batch,
                    args.mode,
                    args.remat,
                )
                print(json.dumps(row), flush=True)


def run_devices(devices: int, args) -> list[dict]:
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""),
    )
    command = [sys.executable, os.path.abspath(__file__), "--worker", *sys.argv[1:]]
    rows = []
    with subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, text=True) as proc:
        for line in proc.stdout:
            row = json.loads(line)
            rows.append(row)
            if args.mode == "calibrate":
                print(f"CPU-compiled peak of the benchmark step: {row}", flush=True)
            else:
                print(_markdown_rows([row], args.mode)[-1], flush=True)
    if proc.returncode:
        raise SystemExit(f"worker with {devices} devices failed (exit {proc.returncode}).")
    return rows


def _gib(value: int) -> str:
    return f"{value / GiB:.2f}"


def _fits(total_bytes: float) -> str:
    return ", ".join(name for name, budget in BUDGETS.items() if total_bytes <= budget) or "neither"


def _markdown_rows(rows: list[dict], mode: str, cpu_over_gpu: float | None = None) -> list[str]:
    header = "| model | px | devices | data x fsdp | batch/device | params+EMA+Adam GiB |"
    rule = "|---|---|---|---|---|---|"
    if mode == "compile":
        header += " args GiB | temp GiB | out-alias GiB | total GiB | fits (total) |"
        rule += "---|---|---|---|---|"
        if cpu_over_gpu:
            header += f" with temp / {cpu_over_gpu:g} GiB | fits (temp / {cpu_over_gpu:g}) |"
            rule += "---|---|"
    lines = [header, rule]
    for row in rows:
        line = (
            f"| {row['model']} | {row['resolution']} | {row['devices']} | "
            f"{row['data']} x {row['fsdp']} | {row['per_device_batch']} | "
            f"{_gib(row['state_bytes'])} |"
        )
        if mode == "compile":
            line += (
                f" {_gib(row['argument_bytes'])} | {_gib(row['temp_bytes'])} | "
                f"{_gib(row['output_bytes'] - row['alias_bytes'])} | "
                f"{_gib(row['total_bytes'])} | {_fits(row['total_bytes'])} |"
            )
            if cpu_over_gpu:
                # Only temporaries depend on the backend; arguments and outputs are exact.
                scaled = row["total_bytes"] - row["temp_bytes"] * (1 - 1 / cpu_over_gpu)
                line += f" {_gib(scaled)} | {_fits(scaled)} |"
        lines.append(line)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("state", "compile", "calibrate"), default="compile")
    parser.add_argument("--devices", default="64,256", help="fake device counts, comma-separated")
    parser.add_argument("--models", default="DiffuSSM-XL,DiT-XL/2")
    parser.add_argument("--resolutions", default="256,512")
    parser.add_argument("--fsdp", default="1,8,64,256", help="fsdp sizes (data = devices/fsdp)")
    parser.add_argument("--global_batch", type=int, default=256, help="the papers' batch: 256")
    parser.add_argument(
        "--remat",
        type=lambda s: {"1": "full", "true": "full", "0": "none", "false": "none"}.get(
            s.lower(), s
        ),
        default="full",
        help="none | full | save_matmuls | ssm_only (full: the ImageNet configs' default)",
    )
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    parser.add_argument(
        "--cpu_over_gpu",
        type=float,
        default=None,
        help="add columns with the temporaries divided by this factor (from --mode=calibrate)",
    )
    parser.add_argument(
        "--table_from",
        default=None,
        help="comma-separated .jsonl files of earlier runs: print their table, compile nothing",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    rows = []
    if args.table_from:
        for path in args.table_from.split(","):
            with open(path) as f:
                rows += [json.loads(line) for line in f]
    else:
        for devices in map(int, args.devices.split(",")):
            rows += run_devices(devices, args)
    if args.mode == "calibrate":
        return
    table = "\n".join(_markdown_rows(rows, args.mode, args.cpu_over_gpu))
    print("\n" + table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(
                f"<!-- python scripts/{os.path.basename(__file__)} {' '.join(sys.argv[1:])} -->\n"
            )
            f.write(table + "\n")
        with open(os.path.splitext(args.out)[0] + ".jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)


if __name__ == "__main__":
    main()
