"""The multi-process flags every launcher shares, and the call that applies them.

On Cloud TPU pods, under SLURM (`srun`) and under Open MPI (`mpirun`) nothing needs passing:
each process detects its place in the job. Elsewhere every process gets the same
--coordinator_address and --num_processes and its own --process_id (docs/pod.md).
"""

from absl import flags

from diffussm_jax.parallel import runtime

flags.DEFINE_enum(
    "distributed",
    "auto",
    runtime.MODES,
    "auto: join a multi-process job when the flags below are given or SLURM / Open MPI / a "
    "Cloud TPU VM is detected; on: always call jax.distributed.initialize; off: never.",
)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
flags.DEFINE_integer("num_processes", None, "Number of processes in the job.")
flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
flags.DEFINE_integer(
    "initialization_timeout", 300, "Seconds to wait for every process to reach the coordinator."
)
FLAGS = flags.FLAGS


def initialize() -> None:
    """Joins the multi-process job the flags describe (or none); call before any jax work."""
    runtime.initialize(
        runtime.plan_initialization(
            FLAGS.distributed,
            FLAGS.coordinator_address,
            FLAGS.num_processes,
            FLAGS.process_id,
            initialization_timeout=FLAGS.initialization_timeout,
        )
    )
