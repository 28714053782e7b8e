"""Exception and warning types raised by moepatch, and the one error path every command goes through.

Commands (``moepatch …``, ``scripts/finetune.py``) never show a Python traceback for a user's mistake: a bad
argument exits with status 2 (usage), a missing or malformed file, an unsupported model or a failed check with
status 1, each with one or two lines that name the argument or file and say what was expected.  ``--debug`` (or
``MOEPATCH_DEBUG=1``) re-raises instead, for bug reports.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from collections.abc import Iterator

from model_patches.errors import UnsupportedModelError

DEBUG_ENV = "MOEPATCH_DEBUG"
EXIT_FAILURE = 1
EXIT_USAGE = 2


class MoePatchWarning(UserWarning):
    """A user-actionable warning from moepatch (unknown config keys, statistics that cannot be masked, ...)."""


class UsageError(ValueError):
    """A command-line argument is wrong (exit status 2); the message starts with the argument's name."""

    def __init__(self, argument: str, message: str) -> None:
        self.argument = argument
        self.message = message
        super().__init__(f"{argument}: {message}")


Naming = Callable[[str], str]
"""How a message names a field: the field itself in the library, the user's flag once a command maps it."""

Wording = Callable[[Naming], str]
"""A message that names other fields (``lambda name: f"more than {name('max_lora_rank')} {limit}"``): written
once, worded by whoever knows how the user spelled those fields."""


def _field_itself(field: str) -> str:
    return field


def _fixed(text: str) -> Wording:
    """The wording of a message that names no other field."""
    return lambda _name: text


class FieldError(ValueError):
    """A value the library was given is wrong, named by its field (``data_dir``, ``train_files``, a config key path):
    library code raises it without knowing how a user spelled the value; the command or training layer that does
    maps the field to its flag (:meth:`as_usage_error`), so no message is parsed back.

    ``message`` is text, or a :data:`Wording` when it names other fields too (``only with head retrieval`` reads
    ``only with --head retrieval`` on the command line): each one is then worded by the same mapping."""

    def __init__(self, field: str, message: str | Wording) -> None:
        self.field = field
        self._wording: Wording = message if callable(message) else _fixed(message)
        self.message = self._wording(_field_itself)
        super().__init__(f"{field}: {self.message}")

    def worded(self, flags: dict[str, str]) -> str:
        """The message with every field it names spelled as ``flags`` gives it (the field itself when absent)."""
        return self._wording(lambda field: flags.get(field, field))

    def as_usage_error(self, flags: dict[str, str]) -> UsageError:
        """The same problem as a :class:`UsageError` naming the flag ``flags`` gives for the field (the field itself
        when absent)."""
        return UsageError(flags.get(self.field, self.field), self.worded(flags))

    def as_command_error(self, flags: dict[str, str]) -> CommandError:
        """The same problem as a :class:`CommandError` (exit status 1: the value is well formed, what it names is
        not — a corpus with no document), worded like :meth:`as_usage_error`."""
        return CommandError(f"{flags.get(self.field, self.field)}: {self.worded(flags)}")


class FieldProblems(FieldError):
    """Several wrong values of one request, all reported at once (a user fixes them in one go): ``problems`` lists
    ``(field, message)``; the first field is the one a command names, the message lists every problem."""

    def __init__(self, heading: str, problems: list[tuple[str, str]], *, one_line: bool = False) -> None:
        self.problems = list(problems)
        super().__init__(problems[0][0], "; ".join(message if index == 0 else f"{field}: {message}"
                                                   for index, (field, message) in enumerate(problems)))
        listed = [f"{field}: {message}" for field, message in problems]
        self.args = (f"{heading}: " + "; ".join(listed) if one_line else f"{heading}:\n  " + "\n  ".join(listed),)

    def worded(self, flags: dict[str, str]) -> str:
        """The first problem's message (a command names its flag in front), then each other problem after its own
        flag: ``expected true or false, got 'yes'; --aux_loss_coef: expected a finite number >= 0, got -1.0``."""
        return "; ".join(message if index == 0 else f"{flags.get(field, field)}: {message}"
                         for index, (field, message) in enumerate(self.problems))


class BlockMisfitError(ValueError):
    """A checkpoint's moepatch block does not fit the model it was loaded with (``apply``'s own message), raised
    where the load applies it, so a command can name the checkpoint's config.json without reading the message."""


class CommandError(RuntimeError):
    """A command could not do its work for a reason the user can act on (exit status 1): a missing or malformed
    file, a failed check, a figure that cannot be computed exactly."""


def debug_requested(argv: list[str] | None = None) -> bool:
    """``--debug`` among the arguments or ``MOEPATCH_DEBUG`` set to a true value."""
    if argv is not None and "--debug" in argv:
        return True
    return os.environ.get(DEBUG_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


@contextlib.contextmanager
def short_warnings(prog: str) -> Iterator[None]:
    """Print a :class:`MoePatchWarning` as ``PROG: warning: message`` — one line, like the command's errors —
    instead of Python's ``file:line: MoePatchWarning: ...`` and the source line; other warnings are untouched."""
    original = warnings.formatwarning

    def format_warning(message, category, filename, lineno, line=None):  # warnings.formatwarning's signature
        if issubclass(category, MoePatchWarning):
            return f"{prog}: warning: {message}\n"
        return original(message, category, filename, lineno, line)

    warnings.formatwarning = format_warning
    try:
        yield
    finally:
        warnings.formatwarning = original


def os_error_text(error: OSError) -> str:
    """An ``OSError`` as a user reads it: ``FILE: reason`` (``No space left on device``), without Python's
    ``[Errno 28]`` prefix or the exception's type."""
    reason = error.strerror or str(error) or type(error).__name__
    names = [os.fspath(name) for name in (error.filename, getattr(error, "filename2", None)) if name is not None]
    return f"{' -> '.join(names)}: {reason}" if names else reason


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, a scheduler stopping the job) raised where the command is, like Ctrl-C, so
    every staged write on the way out removes its temporary copy and leaves its target as it was."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (in the main thread; elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum: int, frame: object) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def first_line(error: BaseException) -> str:
    """An exception's first line, or its type's name when it has no message (third-party errors can be long)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if lines[0].endswith(":") and len(lines) > 1:  # "Validation error for field 'x':" says what only on line two
        return f"{lines[0]} {lines[1]}"
    return lines[0]


def run_guarded(prog: str, body: Callable[[], int], *, debug: bool = False) -> int:
    """Run a command's ``body`` and turn every failure into an exit status and a short message on stderr.

    Args:
        prog (`str`): the command's name, the prefix of every message (``moepatch profile``).
        body (`Callable[[], int]`): the command; returns its exit status.
        debug (`bool`, *optional*, defaults to `False`): re-raise instead (full traceback).

    Returns:
        `int`: 0 on success, 2 for a :class:`UsageError` or an :class:`UnsupportedModelError` (the arguments name
        a model moepatch cannot patch), 1 for any other failure, 130 on Ctrl-C, 143 on SIGTERM.
    """
    try:
        with short_warnings(prog), sigterm_as_interrupt():
            return body()
    except SystemExit:  # argparse has already printed its usage message
        raise
    except KeyboardInterrupt as error:
        if debug:
            raise
        terminated = isinstance(error, Terminated)
        print(f"{prog}: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 143 if terminated else 130
    except (UsageError, UnsupportedModelError) as error:  # the arguments name something moepatch cannot take
        if debug:
            raise
        print(f"{prog}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (CommandError, ValueError, json.JSONDecodeError) as error:
        if debug:
            raise
        print(f"{prog}: error: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as error:  # a file the command reads or writes: its name and the reason in words, no [Errno N]
        if debug:
            raise
        print(f"{prog}: error: {os_error_text(error)}", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as error:  # an unexpected failure: still no traceback, but say how to get one
        if debug:
            raise
        print(f"{prog}: error: {type(error).__name__}: {error}", file=sys.stderr)
        print(f"{prog}: (run again with --debug or {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        return EXIT_FAILURE


__all__ = ["BlockMisfitError", "CommandError", "DEBUG_ENV", "EXIT_FAILURE", "EXIT_USAGE", "FieldError",
           "FieldProblems", "MoePatchWarning", "Naming", "Terminated", "UnsupportedModelError", "UsageError",
           "Wording", "debug_requested", "first_line", "os_error_text", "run_guarded", "short_warnings",
           "sigterm_as_interrupt"]
