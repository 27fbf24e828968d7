"""Benchmarks: model sizes, throughput, scaling with sequence length, SSM backends.

    python -m launch.benchmark --mode=models
    python -m launch.benchmark --mode=throughput --width=256 --depth=2 --input_sizes=32
    python -m launch.benchmark --mode=scaling --width=128 --input_sizes=16,32,48,64,96,128
    python -m launch.benchmark --mode=ssm --width=256 --lengths=1024,4096,16384
    # accelerator (see scripts/gpu_bench.sh):
    python -m launch.benchmark --mode=throughput --models=DiffuSSM-XL,DiT-XL/2 \
        --precision=bfloat16 --scan_layers --train_only --batch_sizes=256,128,64,32

Writes <out_dir>/<mode>.md, .csv and .png; see diffussm_jax/benchmarks/ for what is measured.
"""

import shlex
import sys

from absl import app, flags

from diffussm_jax import benchmarks, models
from launch import cli

_DEFAULTS = benchmarks.Options()
FLAGS = flags.FLAGS
flags.DEFINE_enum("mode", None, benchmarks.MODES, "What to measure.")
flags.DEFINE_string("out_dir", _DEFAULTS.out_dir, "Where the .md, .csv and .png go.")
flags.DEFINE_list("models", list(_DEFAULTS.models), "'DiffuSSM', 'DiT/<patch>' or registry names.")
flags.DEFINE_list("backends", None, "SSM backends: of every DiffuSSM entry, or of ssm mode.")
flags.DEFINE_integer(
    "width", _DEFAULTS.width, "D of the 'DiffuSSM' / 'DiT/<p>' models and ssm mode."
)
flags.DEFINE_integer("depth", _DEFAULTS.depth, "Depth of the 'DiffuSSM' / 'DiT/<p>' models.")
flags.DEFINE_string(
    "precision",
    _DEFAULTS.precision,
    "float32, bfloat16 (bf16 compute; params, residual stream and SSM float32) or role=dtype "
    "pairs, e.g. compute=bfloat16,residual=bfloat16 (diffussm_jax/models/precision.py).",
)
flags.DEFINE_alias("dtype", "precision")  # the flag's name before the policy had four roles


@flags.validator("precision")
def _known_precision(text: str) -> bool:
    try:
        models.Precision.parse(text)
    except models.PrecisionError as error:
        raise flags.ValidationError(str(error)) from None
    return True


flags.DEFINE_list("input_sizes", None, "Latent sides (L = side^2); mode defaults if unset.")
flags.DEFINE_list("batch_sizes", None, "Per-device batch sizes, descending; largest that fits.")
flags.DEFINE_integer("repeats", _DEFAULTS.repeats, "Timed calls per measurement (best is kept).")
flags.DEFINE_float("time_budget_s", _DEFAULTS.time_budget_s, "Stop repeating after this long.")
flags.DEFINE_float("memory_cap_gb", None, "Skip configs predicted above this (GiB).")
flags.DEFINE_bool("scan_layers", _DEFAULTS.scan_layers, "nn.scan over layers (fast compile).")
flags.DEFINE_bool("train_only", _DEFAULTS.train_only, "throughput: train step only.")
flags.DEFINE_bool(
    "interleave", _DEFAULTS.interleave, "Time configurations round-robin (shared machines)."
)
flags.DEFINE_integer("matmul_size", None, "Side of the matmul that measures the peak rate.")
flags.DEFINE_list("lengths", None, "ssm mode: sequence lengths.")
flags.DEFINE_list("chunk_sizes", None, "ssm mode: chunk sizes T of the chunked backend.")
flags.DEFINE_bool("kernel_memory", True, "ssm mode: add the D=1152 kernel-memory table.")

# Per-mode defaults for the list flags left unset, sized for a 2-core CPU.
_MODE_DEFAULTS = {
    "models": dict(input_sizes=(32, 64), batch_sizes=(1,), backends=("fft",)),
    "throughput": dict(input_sizes=(32,), batch_sizes=(8,), backends=("fft", "chunked")),
    "scaling": dict(
        input_sizes=(16, 32, 48, 64, 96, 128), batch_sizes=(1,), backends=("fft", "chunked")
    ),
    "ssm": dict(input_sizes=(), batch_sizes=(1,), backends=("fft", "scan", "chunked")),
}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    defaults = _MODE_DEFAULTS[FLAGS.mode]

    def ints(name, fallback):
        value = FLAGS[name].value
        return tuple(int(v) for v in value) if value is not None else tuple(fallback)

    options = benchmarks.Options(
        mode=FLAGS.mode,
        out_dir=FLAGS.out_dir,
        command=shlex.join(["python", "-m", "launch.benchmark", *sys.argv[1:]]),
        models=tuple(FLAGS.models),
        backends=tuple(FLAGS.backends or defaults["backends"]),
        width=FLAGS.width,
        depth=FLAGS.depth,
        precision=FLAGS.precision,
        input_sizes=ints("input_sizes", defaults["input_sizes"]),
        batch_sizes=ints("batch_sizes", defaults["batch_sizes"]),
        repeats=FLAGS.repeats,
        time_budget_s=FLAGS.time_budget_s,
        memory_cap_gb=FLAGS.memory_cap_gb,
        scan_layers=FLAGS.scan_layers,
        train_only=FLAGS.train_only,
        interleave=FLAGS.interleave,
        matmul_size=FLAGS.matmul_size,
        lengths=ints("lengths", _DEFAULTS.lengths),
        chunk_sizes=ints("chunk_sizes", _DEFAULTS.chunk_sizes),
        kernel_memory=FLAGS.kernel_memory,
    )
    for kind, path in benchmarks.run(options).items():
        print(f"wrote {kind}: {path}")


if __name__ == "__main__":
    flags.mark_flag_as_required("mode")
    cli.run(main)
