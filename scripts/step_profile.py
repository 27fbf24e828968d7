"""Where a benchmark train step's time goes: XLA's ops, timed by jax.profiler, by kind.

    python scripts/step_profile.py                               # DiffuSSM [fft], D=256, depth 2
    python scripts/step_profile.py --model=DiT/1 --top=10
    python scripts/step_profile.py --backend=chunked --batch=8 --side=32

The step is launch.benchmark's (throughput mode: MSE loss, Adam, float32, layers unrolled),
compiled once, warmed up, then traced for --steps calls. Each XLA op's time is averaged over
the traced calls and the ops are counted and their times summed by kind:

  matmul    YNNPACK fusions and dots (the dense layers, attention's products, and the SSM's
            batched kernel-generation products)
  fft       rfft / irfft
  layout    copies, transposes and pads (data moved or zero-extended, not computed)
  other     the rest: elementwise fusions, reductions, the optimizer update

The op times are summed as the thunk executor ran them; where two ran at once on the two
cores both count, so the total can exceed the step time. The --top slowest ops are listed
with their HLO shapes.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

KINDS = ("matmul", "fft", "layout", "other")


def kind_of(op_name: str, opcode: str) -> str:
    """The kind of an optimised-HLO op, from its opcode and, for fusions, XLA's fusion name
    (which lists the ops fused, e.g. "copy_bitcast_fusion.5" or "bitcast_pad_fusion")."""
    if opcode == "fft":
        return "fft"
    if opcode in ("dot", "convolution") or op_name.startswith("ynn_fusion"):
        return "matmul"
    if opcode in ("copy", "transpose", "pad"):
        return "layout"
    if opcode == "fusion" and re.search(r"(^|_)(copy|transpose|pad)(_|$)", op_name):
        return "layout"
    return "other"


def entry_ops(hlo_text: str) -> dict[str, tuple[str, str]]:
    """{op name: (opcode, result shape)} for the entry computation's instructions."""
    entry = hlo_text[hlo_text.index("\nENTRY") :]
    ops = {}
    for match in re.finditer(r"%([\w.\-]+) = (\S+) ([\w\-]+)\(", entry):
        ops[match[1]] = (match[3], match[2])
    return ops


def op_times(trace_dir: str, calls: int) -> collections.Counter:
    """Milliseconds per call of each XLA op in a jax.profiler perfetto trace."""
    (path,) = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    with gzip.open(path) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    times = collections.Counter()
    for event in events:
        if event.get("ph") == "X" and "hlo_op" in event.get("args", {}):
            times[event["name"]] += event["dur"] / 1e3 / calls
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="DiffuSSM", help='"DiffuSSM", "DiT/<patch>"')
    parser.add_argument("--backend", default="fft", help="the SSM backend (DiffuSSM)")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--side", type=int, default=32, help="latent side; L = side^2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="calls traced")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()

    from diffussm_jax.parallel import host_allocator

    host_allocator.retain_freed_memory()  # as the benchmark launcher does

    import jax

    from diffussm_jax.benchmarks import options, specs, steps

    try:
        (spec,) = specs.model_specs([args.model], [args.backend], args.width, args.depth)
    except ValueError as error:
        parser.error(str(error))
    step = steps.compile_step(spec, "train", args.side, args.batch, options.Options())
    state = {"args": step.args}

    def run(calls: int) -> None:
        for _ in range(calls):
            out = step.compiled(*state["args"])
            state["args"] = step.carry(out, state["args"])
        jax.block_until_ready(out)

    run(3)
    start = time.perf_counter()
    run(args.steps)
    seconds = (time.perf_counter() - start) / args.steps
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            run(args.steps)
        times = op_times(trace_dir, args.steps)

    ops = entry_ops(step.compiled.as_text())
    by_kind, count = collections.Counter(), collections.Counter()
    for name, ms in times.items():
        kind = kind_of(name, ops.get(name, ("?", "?"))[0])
        by_kind[kind] += ms
        count[kind] += 1
    total = sum(by_kind.values())
    print(
        f"{spec.label}, D = {args.width}, depth {args.depth}, L = {args.side**2}, batch "
        f"{args.batch}: {seconds:.3f} s per step untraced; host malloc: "
        f"{host_allocator.describe()}; load {os.getloadavg()[0]:.2f}\n"
    )
    print("| kind | ops | ms per step | share |\n|---|---|---|---|")
    for kind in KINDS:
        print(f"| {kind} | {count[kind]} | {by_kind[kind]:.2f} | {by_kind[kind] / total:.0%} |")
    print(f"| all ops | {sum(count.values())} | {total:.2f} | |\n")
    print("| op | kind | shape | ms per step |\n|---|---|---|---|")
    for name, ms in times.most_common(args.top):
        opcode, shape = ops.get(name, ("?", "?"))
        print(f"| {name} | {kind_of(name, opcode)} | `{shape}` | {ms:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
