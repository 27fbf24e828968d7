"""How every launcher starts: absl's `app.run`, with command-line mistakes reported in one line.

A mistake on the command line (an unknown flag or config field, a value of the wrong type, a bad
config argument) ends with the problem, the fix where one is known, and exit status 2, not a
traceback through absl and ml_collections:

    launch.train: error: --config.global_batchsize=8: the config has no field 'global_batchsize'.
    Did you mean "global_batch_size"? ...

Errors raised later, while the job runs, keep their tracebacks: those are bugs, or failures
that the job's own messages explain.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable

from absl import app, flags

from diffussm_jax.parallel import host_allocator
from diffussm_jax.training import train_state

USAGE_EXIT_STATUS = 2
# What parsing raises for a user's mistake: absl's flag errors, ml_collections' unknown field
# (AttributeError / KeyError) and wrong value (TypeError / ValueError), a config argument our
# configs reject (ValueError), a config file that is not there (OSError).
_USER_ERRORS = (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError)


def run(main: Callable[[list[str]], None], user_errors: tuple[type, ...] = ()) -> None:
    """`app.run(main)`, parsing the flags with `parse_flags`.

    `user_errors`: exception types that `main` raises for a mistake in its flags (e.g. a
    checkpoint step that does not exist); they end like a parse error, with their message.

    On a CPU-only installation the program first re-executes itself once with glibc's malloc
    set to keep freed memory (`host_allocator.retain_freed_memory`): large buffers otherwise
    cost the kernel a page fault per 4 KiB page on every step.
    """
    host_allocator.retain_freed_memory()

    def checked_main(argv: list[str]) -> None:
        try:
            main(argv)
        except user_errors as error:
            fail(argv[0], str(error))

    app.run(checked_main if user_errors else main, flags_parser=parse_flags)


def fail(argv0: str, message: str) -> None:
    """Prints `message` as the program's error and exits with status 2."""
    program = _program_name(argv0)
    print(f"{program}: error: {message}", file=sys.stderr)
    print(f"{program}: --helpshort lists the flags.", file=sys.stderr)
    sys.exit(USAGE_EXIT_STATUS)


def parse_flags(argv: list[str]) -> list[str]:
    """Parses `argv` into absl's FLAGS; a mistake prints one message and exits with status 2."""
    try:
        remaining = flags.FLAGS(argv)
        for name in flags.FLAGS:
            # A config file that failed to load raises (OSError) only when the config is read.
            getattr(flags.FLAGS[name].value, "keys", None)
        return remaining
    except _USER_ERRORS as error:
        fail(argv[0], describe(error, argv[1:]))


def describe(error: Exception, args: list[str]) -> str:
    """One message for a parse error: the offending argument, the problem and the fix."""
    text = _message(error)
    if "Traceback (most recent call last)" in text:  # a config file's error, as text
        text = text.rstrip().splitlines()[-1]
    # ml_collections names the field in quotes with a did-you-mean, or bare when it has none.
    field = re.match(r"'([^']+)'\n?(.*)", text, re.DOTALL) or re.fullmatch(r"(\w+)()", text)
    if isinstance(error, (AttributeError, KeyError)) and field:
        name, hint = field.group(1), field.group(2).strip()
        culprit = next((a for a in args if re.match(rf"--config\.(\S+\.)?{name}[.=]", a)), None)
        sentences = [
            f"the config has no field {name!r}.",
            _moved(culprit),
            re.sub(r' instead of "[^"]+"', "", hint),  # the did-you-mean, if any
            "Overrides are --config.FIELD=VALUE with FIELD from the config file "
            "(configs/base.py lists them).",
        ]
        message = " ".join(sentence for sentence in sentences if sentence)
        return f"{culprit}: {message}" if culprit else message
    # A moved field's old name that is now a block (`model`) fails to parse as one.
    flag = re.match(r"flag (--config\.\S+?): ", text)
    if isinstance(error, flags.Error) and flag and _moved(flag.group(1)):
        return f"{flag.group(1)}: {_moved(flag.group(1))}"
    return text


def _moved(argument: str | None) -> str:
    """For `--config.OLD=VALUE` with OLD a moved field: where it is now, as a sentence; else ""."""
    if argument is None:
        return ""
    old = argument.removeprefix("--config.").partition("=")[0]
    new = train_state.MOVED_FIELDS.get(old)
    return f"{old!r} is now {new!r}: --config.{new}=VALUE." if new else ""


def _message(error: Exception) -> str:
    """The error's own text, without the quoting KeyError adds, and its cause's if it has none."""
    text = str(error.args[0]) if error.args else str(error)
    for _ in range(3):  # ml_collections wraps a KeyError's repr inside an AttributeError
        if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
            text = text[1:-1].encode().decode("unicode_escape")
    if not text and error.__cause__ is not None:
        return _message(error.__cause__)
    return text


def _program_name(path: str) -> str:
    """`launch.train` for launch/train.py run as a module; the file name otherwise."""
    parts = os.path.normpath(path).split(os.sep)
    if len(parts) >= 2 and parts[-2] == "launch":
        return "launch." + os.path.splitext(parts[-1])[0]
    return os.path.basename(path)
