"""A testing aid: SIGKILL the process at a chosen filesystem change (``DUALTOKEN_FAULT_AT``)."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

FAULT_ENV = "DUALTOKEN_FAULT_AT"


def _install_fault_injection() -> None:
    """A testing aid, off unless ``DUALTOKEN_FAULT_AT`` is set (tests/training/test_fault_injection.py).

    ``DUALTOKEN_FAULT_AT=TEXT:N`` SIGKILLs this process as it is about to make its N-th filesystem
    change (open a file for writing, make a folder, rename) on a path containing TEXT: for example
    ``step_0000002.staging:3`` inside the step-2 checkpoint save, ``.model.partial:2`` inside the
    final model folder's. Python's audit hooks (PEP 578) see these calls wherever they are made, so
    no writer carries test code. Files written by native code (torch.save to a path, safetensors)
    are not seen themselves; the calls around them are.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec or getattr(_install_fault_injection, "_installed", False):
        return
    text, _, count = spec.rpartition(":")
    if not text or not count.isdigit() or int(count) < 1:
        raise ValueError(f"{FAULT_ENV}={spec!r}; expected TEXT:N with N >= 1")
    target, seen = int(count), 0
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def kill_at_nth_change(event: str, args: tuple[Any, ...]) -> None:
        nonlocal seen
        if event == "open":
            mode, flags = args[1], args[2]
            writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & write_flags)
            paths = args[:1] if writes else ()
        elif event in ("os.mkdir", "os.rename", "tempfile.mkdtemp"):
            paths = args[:2] if event == "os.rename" else args[:1]
        else:
            return
        if any(isinstance(path, str | os.PathLike) and text in str(os.fspath(path)) for path in paths):
            seen += 1
            if seen == target:
                os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(kill_at_nth_change)
    _install_fault_injection._installed = True  # type: ignore[attr-defined]
