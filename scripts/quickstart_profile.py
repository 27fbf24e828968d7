"""Where the quickstart's train step spends its time, against this machine's matmul rate.

Prints one table: the float32 matmul rate of this CPU (the ceiling for the dense layers), then
for the quickstart config (and variants given as dotted overrides) the train step's images/s, its
FLOPs from XLA's cost analysis of the compiled step, the achieved FLOP/s, and the share of the
step's device time by kind of XLA op, read from a profiler trace of a few steps.

    python scripts/quickstart_profile.py                       # the quickstart default
    python scripts/quickstart_profile.py --variants=default,model.scan_layers=true,model=DiT-S/2

A variant is `default`, or comma-free `field=value` overrides joined by `+`
(`model.hidden_size=128+model.scan_layers=true`); `model=...` picks the config argument.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

flags.DEFINE_list("variants", ["default"], "Configs to profile (module doc).")
flags.DEFINE_integer("steps", 10, "Timed steps per variant.")
FLAGS = flags.FLAGS


def matmul_rate(size: int, repeats: int = 10) -> float:
    """float32 GFLOP/s of one jitted (size x size) @ (size x size)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda a, b: a @ b)
    matmul(a, a).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        out = matmul(a, a)
    out.block_until_ready()
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def op_kind(name: str) -> str:
    """Groups XLA:CPU thunk names ("ynn_fusion.12", "fft.3", "copy_bitcast_fusion") by kind."""
    base = re.sub(r"[._]\d+$", "", name)
    if base.startswith(("ynn", "dot")):
        return "matmul"
    if base.startswith("fft"):
        return "fft"
    if "copy" in base or "transpose" in base:
        return "copy / transpose"
    if "dynamic-update-slice" in base or "dynamic-slice" in base:
        return "dynamic (update) slice"
    if "pad" in base:
        return "pad"
    if "tanh" in base or "exponential" in base or "erf" in base:
        return "activations"
    return "other elementwise / reductions"


def profile(variant: str) -> dict:
    import jax
    import jax.numpy as jnp

    from configs import quickstart
    from diffussm_jax import training

    overrides, config_arg = {}, None
    if variant != "default":
        for item in variant.split("+"):
            key, _, value = item.partition("=")
            if key == "model":
                config_arg = f"model={value}"
                continue
            parsed = {"true": True, "false": False}.get(value.lower(), value)
            for kind in (int, float):
                try:
                    parsed = kind(value)
                    break
                except ValueError:
                    pass
            overrides[key] = parsed
    config = quickstart.get_config(config_arg)
    with config.unlocked():
        config.update_from_flattened_dict(overrides)
    experiment = training.setup(config)
    state, step = experiment.init_state(), experiment.train_step()
    size, batch_size = config.data.image_size, config.global_batch_size
    batch = {
        "image": jnp.zeros((batch_size, size, size, config.data.channels)),
        "label": jnp.zeros((batch_size,), jnp.int32),
    }
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    flops = float(compiled.cost_analysis()["flops"])
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(FLAGS.steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / FLAGS.steps

    trace_dir = tempfile.mkdtemp(prefix="quickstart_profile_")
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    for _ in range(3):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    jax.profiler.stop_trace()
    [trace] = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    with gzip.open(trace) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    by_kind: collections.Counter = collections.Counter()
    for event in events:
        name = event.get("name", "")
        if event.get("ph") != "X" or name.startswith("$") or "Thunk" in name or "Pjit" in name:
            continue
        by_kind[op_kind(name)] += event.get("dur", 0)
    total = sum(by_kind.values())
    return dict(
        variant=variant,
        model=config.model_name,
        width=config.model.hidden_size,
        batch=batch_size,
        compile_s=compile_s,
        step_ms=1e3 * seconds,
        images_per_s=batch_size / seconds,
        gflop_per_step=flops / 1e9,
        gflop_per_s=flops / seconds / 1e9,
        shares={kind: us / total for kind, us in by_kind.most_common()},
    )


def main(argv):
    del argv
    rates = {size: matmul_rate(size) for size in (512, 1024, 2048)}
    peak = max(rates.values())
    print(
        "float32 matmul on this CPU: "
        + ", ".join(f"{n}^3 {r:.0f} GFLOP/s" for n, r in rates.items())
    )
    print(f"1-minute load average: {os.getloadavg()[0]:.2f}\n")
    rows = [profile(variant) for variant in FLAGS.variants]
    print(
        "| variant | model | D | batch | compile s | step ms | img/s | GFLOP/step (XLA) "
        "| GFLOP/s | of matmul peak | time by op kind |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        shares = ", ".join(
            f"{kind} {share:.0%}" for kind, share in r["shares"].items() if share >= 0.02
        )
        print(
            f"| {r['variant']} | {r['model']} | {r['width']} | {r['batch']} | {r['compile_s']:.0f} "
            f"| {r['step_ms']:.0f} | {r['images_per_s']:.0f} | {r['gflop_per_step']:.1f} "
            f"| {r['gflop_per_s']:.1f} | {r['gflop_per_s'] / peak:.0%} | {shares} |"
        )


if __name__ == "__main__":
    app.run(main)
