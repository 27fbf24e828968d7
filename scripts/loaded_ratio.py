"""The CPU train-step FLOP/s ratio of DiffuSSM to DiT patch 1 with the machine loaded.

    python scripts/loaded_ratio.py                      # 6 rounds of 2 concurrent benchmarks
    python scripts/loaded_ratio.py --rounds=3 -- --backends=fft,chunked --batch_sizes=32

Issue 15's CPU proxy: the ratio at equal width and length, "with the machine loaded (two
concurrent benchmark processes)". Each round starts --concurrent copies of

    python -m launch.benchmark --mode=throughput --models=DiffuSSM,DiT/1 --backends=fft \
        --train_only --repeats=5

at once, each into its own --out_dir/round<i>_<j>, waits for all of them, and starts the
next round. Flags after `--` go to every copy (a flag given twice: the later value holds).
On a shared 2-core host one process's step varies by 10-40% from round to round, so a single
pair cannot decide a target that sits near 100%; the summary gives the spread of every
process's ratio, its median, and how many processes reached 100%.

Writes <out_dir>/loaded_ratio.md: one row per process, then the summary.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARK = [
    "-m",
    "launch.benchmark",
    "--mode=throughput",
    "--models=DiffuSSM,DiT/1",
    "--backends=fft",
    "--train_only",
    "--repeats=5",
]
NUMERIC = ("resolution", "seconds", "images_per_s", "dense_tflops", "xla_tflops", "load_1min")


def read_rows(path: str) -> list[dict]:
    """A benchmark's throughput.csv as rows, with the columns the ratios need as numbers."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in NUMERIC:
            if row.get(key) not in (None, ""):
                row[key] = float(row[key])
    return rows


def process_ratios(name: str, rows: list[dict]) -> list[dict]:
    """One entry per (DiffuSSM row, DiT row) of one process: the two FLOP/s ratios, the
    step times they come from, and the load at the end."""
    from diffussm_jax.benchmarks.modes import throughput_ratios

    seconds = {r["model"]: r["seconds"] for r in rows}
    load = max((r["load_1min"] for r in rows if isinstance(r.get("load_1min"), float)), default=0)
    return [
        dict(
            process=name,
            model=entry["model"],
            baseline=entry["baseline"],
            resolution=int(entry["resolution"]),
            seconds=seconds[entry["model"]],
            baseline_seconds=seconds[entry["baseline"]],
            dense_ratio=entry["dense_tflops_ratio"],
            xla_ratio=entry.get("xla_tflops_ratio", float("nan")),
            load=load,
        )
        for entry in throughput_ratios(rows)
    ]


def summarise(entries: list[dict], target: float = 1.0) -> list[dict]:
    """Per (model, baseline, resolution): the spread and median of the processes' ratios and
    how many reached `target`."""
    groups: dict[tuple, list[dict]] = {}
    for e in entries:
        groups.setdefault((e["model"], e["baseline"], e["resolution"]), []).append(e)
    summary = []
    for (model, baseline, resolution), group in groups.items():
        dense = [e["dense_ratio"] for e in group]
        xla = [e["xla_ratio"] for e in group]
        summary.append(
            dict(
                model=model,
                baseline=baseline,
                resolution=resolution,
                processes=len(group),
                dense_min=min(dense),
                dense_median=statistics.median(dense),
                dense_max=max(dense),
                xla_median=statistics.median(xla),
                at_or_above_target=sum(d >= target for d in dense),
            )
        )
    return summary


def markdown(entries: list[dict], summary: list[dict], command: str) -> str:
    lines = [
        "# Loaded train-step FLOP/s ratio, DiffuSSM / DiT",
        "",
        f"- command: `{command}`",
        "",
        "| process | model | baseline | px | s/step | baseline s/step | dense ratio | XLA ratio "
        "| load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        lines.append(
            f"| {e['process']} | {e['model']} | {e['baseline']} | {e['resolution']} "
            f"| {e['seconds']:.3f} | {e['baseline_seconds']:.3f} | {e['dense_ratio']:.1%} "
            f"| {e['xla_ratio']:.1%} | {e['load']:.2f} |"
        )
    lines += [
        "",
        "| model | baseline | px | processes | dense ratio min / median / max | XLA ratio median "
        "| processes >= 100% |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['model']} | {s['baseline']} | {s['resolution']} | {s['processes']} "
            f"| {s['dense_min']:.1%} / {s['dense_median']:.1%} / {s['dense_max']:.1%} "
            f"| {s['xla_median']:.1%} | {s['at_or_above_target']} of {s['processes']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6, help="rounds of concurrent processes")
    parser.add_argument("--concurrent", type=int, default=2, help="processes per round")
    parser.add_argument("--out_dir", default="/tmp/loaded_ratio")
    args = parser.parse_args(own)
    if args.rounds < 1 or args.concurrent < 1:
        parser.error(
            f"--rounds={args.rounds} --concurrent={args.concurrent}: both must be at least 1."
        )
    if any(flag.startswith("--out_dir") for flag in extra):
        parser.error("give --out_dir before `--`: each process writes under it on its own.")

    os.makedirs(args.out_dir, exist_ok=True)
    entries = []
    for round_index in range(1, args.rounds + 1):
        running = []
        for j in range(1, args.concurrent + 1):
            name = f"round{round_index}_{j}"
            out_dir = os.path.join(args.out_dir, name)
            command = [sys.executable, *BENCHMARK, *extra, f"--out_dir={out_dir}"]
            log = open(os.path.join(args.out_dir, name + ".log"), "w")
            running.append(
                (
                    name,
                    out_dir,
                    log,
                    subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT),
                )
            )
        for name, out_dir, log, process in running:
            code = process.wait()
            log.close()
            if code != 0:
                with open(log.name) as f:
                    tail = f.read()[-2000:]
                print(f"{name}: the benchmark exited with status {code}:\n{tail}", file=sys.stderr)
                return 2 if code == 2 else 1
            entries += process_ratios(name, read_rows(os.path.join(out_dir, "throughput.csv")))
        done = [e for e in entries if e["process"].startswith(f"round{round_index}_")]
        print(f"round {round_index}: " + ", ".join(f"{e['dense_ratio']:.1%}" for e in done))

    summary = summarise(entries)
    command = " ".join(["python scripts/loaded_ratio.py", *own, *(["--", *extra] if extra else [])])
    text = markdown(entries, summary, command)
    with open(os.path.join(args.out_dir, "loaded_ratio.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
