"""Ctrl-C during training: the first one stops the run cleanly after the current step, the second at once.

While the loop runs, :class:`StopRequest` holds SIGINT: the first Ctrl-C only sets a flag (the step in progress,
its evaluation and checkpoint finish), the trainer then writes a checkpoint and raises :class:`TrainInterrupted`,
whose message is the command that resumes the run; ``glmtune train`` prints it and exits 130. A second Ctrl-C
raises ``KeyboardInterrupt`` at once (nothing more is saved; the last checkpoint stays complete).

Under torchrun every rank gets the terminal's SIGINT; the flags are all-reduced where the trainer reads its numbers
back anyway (every ``log.every_steps`` and where it evaluates or saves), so all ranks stop after the same step.
"""

from __future__ import annotations

import logging
import shlex
import signal
import threading
from pathlib import Path
from types import FrameType

from glmtune.train.distributed import DistInfo, all_reduce_sum

log = logging.getLogger(__name__)

EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for a program stopped by Ctrl-C


class TrainInterrupted(KeyboardInterrupt):
    """The run stopped on Ctrl-C after step ``step`` with a checkpoint in ``checkpoint``; the message says how to go
    on. A ``KeyboardInterrupt``, so that code catching ``Exception`` does not swallow it."""

    def __init__(self, step: int, checkpoint: Path | None, command: str) -> None:
        saved = f"checkpoint {checkpoint}" if checkpoint is not None else "no checkpoint (none could be written)"
        super().__init__(f"stopped by Ctrl-C after step {step}; {saved}. Resume with:\n  {command}")
        self.step, self.checkpoint, self.command = step, checkpoint, command


def resume_command(run_dir: Path, world_size: int = 1, per_node: int | None = None) -> str:
    """The shell command that continues the run in ``run_dir`` (through torchrun when several processes ran; on
    every machine, with the rendezvous address to fill in, when they ran on several)."""
    run = f"-m glmtune train --resume {shlex.quote(str(run_dir))}"
    if per_node and world_size > per_node:
        return (f"torchrun --nnodes {world_size // per_node} --nproc-per-node {per_node} --rdzv-backend c10d "
                f"--rdzv-endpoint HOST:PORT {run}  (on every machine)")  # fmt: skip
    if world_size > 1:
        return f"torchrun --nproc-per-node {world_size} {run}"
    return f"glmtune train --resume {shlex.quote(str(run_dir))}"


class StopRequest:
    """Use as ``with StopRequest(info) as stop:``; ``stop.due(synced)`` tells the loop to stop after this step."""

    def __init__(self, info: DistInfo) -> None:
        self.info = info
        self.requested = False
        self._previous: signal.Handlers | None = None
        self._installed = False

    def __enter__(self) -> StopRequest:
        # signal handlers can only be set from the main thread (a run in a worker thread keeps the default)
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:  # (None: a handler not set from Python; the default is the closest)
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)
            self._installed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt  # the second Ctrl-C: stop at once
        self.requested = True
        if self.info.is_main:
            log.warning("Ctrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to quit at once, "
                        "losing the steps since the last checkpoint)")  # fmt: skip

    def due(self, synced: bool) -> bool:
        """Whether to stop now. With several processes the ranks agree at ``synced`` points only (the trainer reads
        its numbers back there anyway); in between each rank goes on."""
        if not self.info.enabled:
            return self.requested
        if not synced:
            return False
        return all_reduce_sum(self.info, [float(self.requested)])[0] > 0


def no_space_message(error: BaseException, run_dir: Path, last: Path | None, world_size: int = 1,
                     per_node: int | None = None) -> str:  # fmt: skip
    """What a run that filled the disk says: the file, the last good checkpoint, how to go on."""
    good = f"the last good checkpoint is {last}" if last is not None else "no checkpoint was complete yet"
    return (f"{error}; {good} (the partial files were removed). Free some space, then resume with: "
            f"{resume_command(run_dir, world_size, per_node)}")  # fmt: skip


def lost_peer_message(error: BaseException, rank: int, run_dir: Path, last: Path | None, world_size: int,
                      per_node: int | None = None) -> str:  # fmt: skip
    """What a rank says when another process of the run stopped (or stopped answering) in a collective."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    good = f"the last complete checkpoint is {last}" if last is not None else "no checkpoint was complete yet"
    return (f"rank {rank} lost contact with another process of the run ({first[:300]}). A process or a machine "
            "stopped: torchrun on the machine where it stopped names its rank and exit code ('Root Cause'). "
            f"{good[0].upper()}{good[1:]}; once every machine is back, resume with: "
            f"{resume_command(run_dir, world_size, per_node)}")  # fmt: skip
