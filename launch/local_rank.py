"""One rank of a local run: the command ``launch/local.py`` has torch's elastic agent start in each
rank process (``python launch/local_rank.py [trainer arguments]``). Not meant to be run by hand.

It runs ``trainer.train`` with three things around it that the trainer itself must not know about:

* the rank dies with the launcher, even when the launcher is SIGKILLed: the agent starts every rank
  in a session of its own, so nothing else would stop it (``PR_SET_PDEATHSIG``);
* an uncaught error is written to the agent's error file (torchelastic's ``record``), so the
  launcher reports the first failing rank's error and where its traceback is;
* a restarted rank group (``launch/local.py --max-restarts N``) says so once, on rank 0.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LAUNCHER_PID = "GOEMBED_LAUNCHER_PID"  # set by launch/local.py: the process this rank must die with
_PR_SET_PDEATHSIG = 1


def die_with_launcher() -> None:
    """Ask the kernel for SIGTERM when the launcher dies (even by SIGKILL); exit at once if it already has."""
    launcher = int(os.environ.get(LAUNCHER_PID, "0"))
    if not launcher:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != launcher:  # the launcher died before prctl took effect
        os._exit(1)


def announce_restart() -> None:
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restart and os.environ.get("LOCAL_RANK") == "0":
        limit = os.environ.get("TORCHELASTIC_MAX_RESTARTS", "?")
        print(f"launcher: restart {restart} of {limit} (--max-restarts): every rank starts again and resumes "
              "from the run's latest checkpoint", file=sys.stderr, flush=True)


def main() -> int:
    die_with_launcher()
    announce_restart()
    os.chdir(ROOT)  # as before the elastic agent: ranks run in the repository root (the launcher made every path absolute)
    from torch.distributed.elastic.multiprocessing.errors import record

    from trainer.train import main as train_main

    return record(train_main)(sys.argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
