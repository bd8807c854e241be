"""Checks of what a user hands to a command: checkpoint files, output folders, option names, counts.

Every check raises :class:`BadInputError`, whose message is one line naming the thing (file, key, value) and the fix.
Commands run these checks before they write anything, and ``var_lab.cli.main`` prints such an error as
``var-lab <command>: error: <message>`` and exits with 2, without a traceback. ``BadInputError`` is a ``ValueError``,
so code that already reports ``ValueError`` as a clear message keeps doing so.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import os
import pickle
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NoReturn, Optional, Union

#: the first bytes of a file written by ``torch.save``: a zip archive (torch >= 1.6) or a pickle (the legacy format)
_TORCH_MAGICS = (b"PK\x03\x04", b"\x80")


class BadInputError(ValueError):
    """A path, key or value given to a command is unusable; the message names it and says how to fix it."""


#: what to pass instead of an unusable tokenizer checkpoint (fit, tokenize)
TOKENIZER_CKPT_FIX = (
    "pass a tokenizer written by `var-lab fit-tokenizer` (RUN/checkpoints/last.ckpt) or the released "
    "vae_ch160v4096z32.pth"
)
#: what to pass instead of an unusable VAR checkpoint (sample, eval)
VAR_CKPT_FIX = "pass a checkpoint written by `var-lab fit` (RUN/checkpoints/last.ckpt)"
#: what to pass instead of an unusable released file (sample, eval)
RELEASE_FIX = "pass the file downloaded from https://huggingface.co/FoundationVision/var (var_d16.pth, ...)"


# ------------------------------------------------------------------------------------------------------ checkpoints
def check_checkpoint_file(path: Union[str, os.PathLike], what: str, fix: str) -> Path:
    """Refuse a checkpoint path that is missing, a folder, unreadable, not written by ``torch.save``, or truncated.

    Cheap: reads the first bytes and, for torch's zip format, the archive's directory at the end of the file (which a
    truncated file lacks), never the weights.

    Args:
        path: the path as the user gave it.
        what: how the user named it (``--checkpoint``, ``tokenizer_ckpt``), for the message.
        fix: what to pass instead, for the message.

    Returns:
        The path.

    Raises:
        BadInputError: naming ``what``, the path, what is wrong with it and ``fix``.
    """
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"{what} {path} does not exist; {fix}")
    if path.is_dir():
        raise BadInputError(f"{what} {path} is a folder, not a checkpoint file; {fix}")
    try:
        with open(path, "rb") as handle:
            head = handle.read(512)
    except OSError as err:
        raise BadInputError(f"{what} {path} cannot be read ({err.strerror}); {fix}") from None
    if not head.startswith(_TORCH_MAGICS):
        kind = "an empty file" if not head else "a text file" if _looks_like_text(head) else "an unknown binary file"
        raise BadInputError(f"{what} {path} is not a checkpoint: {kind}, not one written by torch.save; {fix}")
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path):
                pass
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise BadInputError(f"{what} {path} is truncated or corrupt ({err}); {fix}") from None
    return path


def _looks_like_text(head: bytes) -> bool:
    try:
        return b"\0" not in head and bool(head.decode("utf-8", errors="strict"))
    except UnicodeDecodeError:  # may also be a multi-byte character cut at the end: good enough for a message
        return False


@contextlib.contextmanager
def checkpoint_load_errors(path: Union[str, os.PathLike], what: str, fix: str) -> Iterator[None]:
    """Turn the errors ``torch.load`` raises for a file that is not a checkpoint into a :class:`BadInputError`.

    For files that pass :func:`check_checkpoint_file` and still fail to unpickle (a zip or pickle of something else).
    """
    try:
        yield
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile) as err:
        why = f"{type(err).__name__}: {short_reason(err)}"
        raise BadInputError(f"{what} {path} cannot be read as a checkpoint ({why}); {fix}") from err
    except RuntimeError as err:
        if "PytorchStreamReader" not in str(err) and "zip archive" not in str(err):
            raise
        raise BadInputError(f"{what} {path} cannot be read as a checkpoint ({short_reason(err)}); {fix}") from err


def short_reason(error: BaseException) -> str:
    """The first sentence of an error's text, on one line (torch's zip errors add four sentences of advice)."""
    text = " ".join(str(error).split())
    return text.split(". ", 1)[0].rstrip(".") or type(error).__name__


# --------------------------------------------------------------------------------------------------- output folders
def check_output_dir(
    path: Union[str, os.PathLike], what: str, fix: Optional[str] = None, writable: bool = True
) -> Path:
    """Refuse an output folder that cannot be created or written, without creating it.

    The nearest existing folder on the path must accept a new entry: a temporary folder is made there and removed at
    once (so a read-only file system, missing permissions or a pseudo file system such as ``/proc`` are found even
    for root, whom ``os.access`` always answers yes).

    Args:
        path: the output folder.
        what: how the user named it (``output_dir``, ``--out``), for the message.
        fix: what to do instead (default: pass another ``what``).
        writable: also check that something can be created there (off for commands that only read the folder).

    Returns:
        The path.

    Raises:
        BadInputError: the path or one of its parents is a file, or nothing can be written there.
    """
    path = Path(path)
    fix = fix or f"pass another {what}"
    if path.exists() and not path.is_dir():
        raise BadInputError(f"{what} {path} is a file, not a folder; {fix} (or move the file away)")
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise BadInputError(f"{what} {path} cannot be created: {existing} is a file, not a folder; {fix}")
    if not writable:
        return path
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".var-lab-write-test-", dir=existing))
    except OSError as err:
        where = "in it" if existing == path else f"in {existing}, where it would be created"
        message = f"{what} {path} is not writable: nothing can be created {where} ({err.strerror}); {fix}"
        raise BadInputError(message) from None
    return path


# ---------------------------------------------------------------------------------------------------- option values
def positive_int(text: str) -> int:
    """An ``argparse`` type: an integer >= 1 (the message says what was given)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; give a whole number >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed; give a whole number >= 1")
    return value


def respell_options(argv: list[str], known: Iterable[str]) -> list[str]:
    """The one flag style: ``--tokenizer_ckpt`` means ``--tokenizer-ckpt`` and ``--data.batch-size`` means
    ``--data.batch_size``, whichever of the two spellings the parser knows.

    Command options are spelt with hyphens (``--tokenizer-ckpt``, ``--output-root``); config keys keep their YAML
    names (``--data.batch_size``). Either separator is accepted for both, so a user never has to remember which
    command is which. Only a name the parser does not know is respelt, and only to a name it knows.
    """
    known = set(known)
    out = []
    for index, arg in enumerate(argv):
        if arg == "--":
            return out + argv[index:]
        if arg.startswith("--") and len(arg) > 2:
            name, sep, value = arg.partition("=")
            if name not in known:
                for other in ("--" + name[2:].replace("_", "-"), "--" + name[2:].replace("-", "_")):
                    if other in known:
                        arg = other + sep + value
                        break
        out.append(arg)
    return out


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line (the error and ``--help``), not the usage first, and
    that takes ``--a_b`` for ``--a-b`` (:func:`respell_options`)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):  # noqa: D102 - argparse's own
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(respell_options(args, self._option_string_actions), namespace)


def nearest(name: str, choices: Iterable[str]) -> Optional[str]:
    """The choice closest to a misspelt ``name`` (difflib), or None when none is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return close[0] if close else None


def check_option_names(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Refuse an unknown ``--option`` before ``parser`` would, naming it and the nearest valid option first.

    (jsonargparse prints its whole usage, 60 lines for ``var-lab fit``, before the error.)

    Raises:
        BadInputError: for the first ``--name`` in ``argv`` that ``parser`` does not know.
    """
    known = set(parser._option_string_actions)  # every spelling, e.g. --model.depth, --tokenizer-ckpt
    for arg in argv:
        if arg == "--":
            break
        if not arg.startswith("--"):
            continue
        name = arg.split("=", 1)[0]
        if name in known or (parser.allow_abbrev and any(k.startswith(name) for k in known)):
            continue  # a prefix is argparse's abbreviation (an ambiguous one is argparse's error)
        suggestion = nearest(name, sorted(k for k in known if k.startswith("--")))
        hint = f"; did you mean {suggestion}?" if suggestion else ""
        raise BadInputError(f"unknown option {name}{hint} ({parser.prog} --help lists every option)")


def report(prog: str, error: BaseException) -> int:
    """Print ``prog: error: <message>`` on stderr and return the exit code 2."""
    print(f"{prog}: error: {error}", file=sys.stderr)
    return 2
