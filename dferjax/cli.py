"""What every command-line tool does with an expected error: one `error: ...` message on stderr and exit status 1,
no traceback (`--verbose` keeps it). A bug (any other exception) keeps its traceback.

    cli.run(lambda: train.train_and_evaluate(config, workdir), verbose=_VERBOSE.value, workdir=workdir)
"""
from __future__ import annotations

import difflib
import errno
import os
import re
import sys
from typing import Callable, Iterator

from dferjax import preemption

# Bad input, a bad config, an unwritable or full disk, a non-finite loss, memory run out: the message says what to do.
EXPECTED_ERRORS = (ValueError, OSError, FloatingPointError, ImportError, MemoryError)
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)
# The disk refused a write: it is full, a quota is used up, or the file-size limit (ulimit -f) is reached.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# Grain adds this note to an error raised in its pipeline: about the traceback, which the one-line message omits.
_TRACEBACK_NOTE = 'Grain has removed its internal frames from the traceback'


# array_record (TFDS's file format, riegeli) names the refused write in its RuntimeError's text only.
_RECORD_WRITE_FAILED = re.compile(r'write\(\) failed: ([^;]+); writing ([^;]+);')
_DISK_FULL_BY_TEXT = {os.strerror(code): code for code in DISK_FULL}


def causes(error: BaseException | None) -> Iterator[BaseException]:
  """`error`, then the error it was raised from or during, and so on (`raise ... from None` ends the chain)."""
  seen = set()
  while error is not None and id(error) not in seen:
    yield error
    seen.add(id(error))
    error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)


def os_error(error: BaseException) -> OSError | None:
  """The OSError behind `error`. Orbax and grain re-raise a worker's failure under their own type; tensorstore
  (Orbax's array writer) raises a ValueError that carries the errno in its text only: a full disk or file-size
  limit there ("... Failed to write 16574 bytes to file 12: File too large [os_error_code='27']") comes back as
  an OSError without a file name; array_record's ("write() failed: File too large; writing <path>; ...") as one
  naming its file."""
  for error in causes(error):
    if isinstance(error, OSError) and error.errno is not None:
      return error
    if (code := re.search(r"\[os_error_code='(\d+)'\]", str(error))) and int(code[1]) in DISK_FULL:
      return OSError(int(code[1]), os.strerror(int(code[1])))
    if (failed := _RECORD_WRITE_FAILED.search(str(error))) and failed[1] in _DISK_FULL_BY_TEXT:
      return OSError(_DISK_FULL_BY_TEXT[failed[1]], failed[1], failed[2])
  return None


def is_disk_full(error: BaseException) -> bool:
  return (found := os_error(error)) is not None and found.errno in DISK_FULL


def last_checkpoint(workdir: str | None) -> str:
  """'the last checkpoint is <workdir>/checkpoints/<step>' (or that there is none) for the closing line."""
  directory = os.path.join(workdir or '', 'checkpoints')
  steps = [int(name) for name in os.listdir(directory) if name.isdigit()] if os.path.isdir(directory) else []
  if not steps:
    return f'no checkpoint was written in {workdir}' if workdir else 'no checkpoint was written'
  return f'the last checkpoint is {os.path.join(directory, str(max(steps)))} (the same command resumes from it)'


def damaged_records(error: BaseException) -> str | None:
  """ArrayRecord's reason when `error` (or one behind it) is its refusal of a damaged file ('Corrupted
  Riegeli/records file: chunk header hash mismatch ...'): a cut copy of a built dataset whose build recorded no file
  sizes (datasets.check_files finds the others before any read)."""
  return next((str(error).strip().splitlines()[0][:300] for error in causes(error) if 'Riegeli' in str(error)), None)


def error_message(error: BaseException, workdir: str | None = None) -> str:
  if reason := damaged_records(error):
    return (f'a built dataset file is damaged ({reason}): copy the dataset again from where it was built, or '
            'rebuild it (scripts/build_dataset.py --overwrite)')
  found = os_error(error)
  where = f' ({found.filename})' if found is not None and found.filename else ''
  if found is not None and found.errno in DISK_FULL:
    checkpoint = f', {last_checkpoint(workdir)}' if workdir else ''  # a training run's; other tools have none
    return (f'the disk refused a write{where}: {found.strerror}; stopped{checkpoint}. Free some space (or raise the '
            'file-size limit, ulimit -f) and rerun.')
  if found is not None and found.errno in _NOT_WRITABLE:
    return f'cannot write{where}: {found.strerror}. Give a directory you can write (--workdir, --data_dir).'
  if isinstance(error, MemoryError) and not str(error):  # Python's own, without a message
    return 'this host ran out of memory (MemoryError)'
  text = str(error) if isinstance(error, (ValueError, OSError, FloatingPointError, MemoryError)) else \
      f'{type(error).__name__}: {error}'
  notes = [note for note in getattr(error, '__notes__', []) if _TRACEBACK_NOTE not in note]
  return '\n'.join([text, *notes])


def run(fn: Callable, *, verbose: bool = False, workdir: str | None = None):
  """fn(); an expected error exits 1 with one message, Ctrl-C exits 130 naming the last checkpoint, a run stopped by
  SIGTERM (preemption.Preempted) exits 143 naming the checkpoint it saved."""
  try:
    return fn()
  except KeyboardInterrupt:
    if verbose:
      raise
    sys.stderr.write(f'\ninterrupted: {last_checkpoint(workdir)}\n' if workdir else '\ninterrupted\n')
    sys.exit(130)
  except preemption.Preempted as stop:  # not an error: the run saved and stops, as its scheduler asked
    sys.stderr.write(f'{stop}: {last_checkpoint(workdir)}\n')
    sys.exit(preemption.EXIT_STATUS)
  except Exception as error:  # pylint: disable=broad-except  # re-raised unless expected
    # Expected: the types above, and a library's own type around an OS error or a damaged record file
    # (array_record's RuntimeError).
    if verbose or not (isinstance(error, EXPECTED_ERRORS) or os_error(error) is not None or damaged_records(error)):
      raise
    sys.stderr.write(f'error: {error_message(error, workdir)}\n')
    sys.exit(1)


def unknown_field_message(config, dotted: str) -> str | None:
  """For an override `--config.optimizer.lr`: which config block lacks which field, its fields and the closest
  name; None when the path exists."""
  node, path = config, 'config'
  for part in dotted.split('.'):
    if not hasattr(node, 'keys') or part not in node:
      fields = sorted(node.keys()) if hasattr(node, 'keys') else []
      initials = [f for f in fields if ''.join(word[:1] for word in f.split('_')) == part or f.startswith(part)]
      closest = initials or difflib.get_close_matches(part, fields, n=1, cutoff=0.4)  # 'lr': learning_rate
      hint = f"; did you mean {path}.{closest[0]}?" if closest else ''
      return f'{path} has no field {part!r} (its fields: {", ".join(fields)}){hint}'
    node, path = node[part], f'{path}.{part}'
  return None


_HELP_FLAGS = ('-h', '-?', '--help', '--helpshort', '--helpfull')


def parse_flags(argv):
  """absl's parsing (app.run's flags_parser) for a command with a `--config` file flag, but `--help` exits 0, a
  misspelt `--config.<field>` names the block's fields, and a missing config file, a bad config argument
  (`:fodl=1`) or a value of the wrong type is one line, not a traceback."""
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  if any(arg in _HELP_FLAGS for arg in argv[1:]):
    app.usage(shorthelp='--helpfull' not in argv, writeto_stdout=True, exitcode=0)
  if (path := config_path(argv)) is not None and not os.path.isfile(path):
    sys.exit(f'error: --config {path}: no such file (from {os.getcwd()})')
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as error:  # config_flags' override of a field that does not exist
    sys.exit(f'error: {override_error(argv) or error}')
  except flags.Error as error:  # a value absl cannot parse, or the config file's own error inside config_flags'
    sys.exit(f'error: {one_line_message(error)}')


def config_flag(argv) -> str | None:
  """The value of the last `--config` flag: `path[:args]`."""
  values = [arg.split('=', 1)[1] if '=' in arg else value for arg, value in zip(argv, [*argv[1:], ''])
            if arg == '--config' or arg.startswith('--config=')]
  return values[-1] if values else None


def config_path(argv) -> str | None:
  return None if (value := config_flag(argv)) is None else value.partition(':')[0]


def one_line_message(error: BaseException) -> str:
  """The outermost one-line message of an error chain: absl's names the flag ('flag --config.batch_size=abc:
  invalid literal ...'); config_flags wraps a config file's own error twice with tracebacks in the text, so there
  it is the innermost."""
  chain = list(causes(error))
  one_line = [text for text in (str(error).strip() for error in chain) if text and '\n' not in text]
  return one_line[0] if one_line else (str(chain[-1]).strip().splitlines() or [type(chain[-1]).__name__])[0]


def override_error(argv) -> str | None:
  """Which `--config.<path>=` override names no field, with the fields that exist and the closest one."""
  from dferjax import configlib  # pylint: disable=import-outside-toplevel
  if (value := config_flag(argv)) is None:
    return None
  path, _, config_arg = value.partition(':')
  config = configlib.load_config(path, config_arg or None)
  for arg in argv:
    if arg.startswith('--config.'):
      if message := unknown_field_message(config, arg[len('--config.'):].split('=', 1)[0]):
        return message
  return None
