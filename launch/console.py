"""The console flags every launcher shares, and the call that applies them.

By default a launcher shows this project's own log lines (`HH:MM:SS message`), progress as a bar
on a terminal or a line every --progress_every_secs otherwise, and a closing summary. Other
libraries' INFO logs (orbax, tfds, jax, absl internals) come back with --library_logs.
"""

from absl import flags

from diffussm_jax import console

flags.DEFINE_bool(
    "library_logs",
    False,
    "Show other libraries' INFO logs (orbax, tfds, jax) in absl's format; by default only "
    "their warnings and errors are shown.",
)
flags.DEFINE_float(
    "progress_every_secs", 30.0, "Seconds between progress lines (when no bar is shown)."
)
flags.DEFINE_enum(
    "progress_bar", "auto", ["auto", "on", "off"], "A progress bar: auto = when on a terminal."
)
FLAGS = flags.FLAGS


def setup() -> None:
    """Applies the flags; call first in main()."""
    console.configure(
        library_logs=FLAGS.library_logs,
        interval_s=FLAGS.progress_every_secs,
        bar={"auto": None, "on": True, "off": False}[FLAGS.progress_bar],
    )
