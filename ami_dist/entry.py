"""What every command (ami-train, ami-export, ami-evaluate, ami-generate, ami-compare, ami-prepare, the replay,
mark_failed) does with its outcome: one helper owns the exit codes and the one-line messages.

  0    done
  1    a bug (its traceback is printed), or a run that stopped itself for the reason it prints (RunStopped)
  2    a user mistake (UserError): one line naming the file, line or key, no traceback
  75   a preempted training run asking to be requeued (returned by ami-train itself)
  130  interrupted (Ctrl-C)
  143  stopped by SIGTERM (a single process; multi-rank runs report it through their watchdog)
"""

from __future__ import annotations

import argparse
import functools
import sys
import traceback
from collections.abc import Callable

from ami_dist.errors import RunStopped, Terminated, UserError

EXIT_OK, EXIT_FAILED, EXIT_USER_ERROR, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143


class Parser(argparse.ArgumentParser):
    """argparse whose own errors follow the one-line, exit-2 rule."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"command line: {message}")


def command(run: Callable[[list[str] | None], int | None]) -> Callable[[list[str] | None], int]:
    """A console entry point around ``run(argv)``: its exit code (None: 0), or the code and message its
    exception calls for (see the module's docstring)."""

    @functools.wraps(run)
    def main(argv: list[str] | None = None) -> int:
        try:
            code = run(argv)
        except UserError as e:
            print(f"ami-dist: error: {e}", file=sys.stderr, flush=True)
            return EXIT_USER_ERROR
        except RunStopped as e:  # the run stopped itself for a reason it states; its checkpoint is saved
            print(f"ami-dist: error: {e}", file=sys.stderr, flush=True)
            return EXIT_FAILED
        except KeyboardInterrupt:
            print("ami-dist: interrupted", file=sys.stderr, flush=True)
            return EXIT_INTERRUPTED
        except Terminated as e:
            print(f"ami-dist: {e}", file=sys.stderr, flush=True)
            return EXIT_TERMINATED
        except Exception:
            traceback.print_exc()
            return EXIT_FAILED
        return EXIT_OK if code is None else code

    return main
