"""Durable file writes shared by every part that must not leave half a file behind: training
checkpoints and logs, and the patches of a split."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

#: Suffix of a file being written; the final name appears only once it is complete.
PARTIAL_SUFFIX = ".partial"


def write_durably(path: Path, mode: str, write: Callable[[IO[Any]], None], *, sync: bool = True) -> None:
    """``write(file)`` into a file beside ``path``, synced, then renamed over ``path`` and the
    rename synced: a crash leaves the old file or the new one, never half of either.

    The file in progress is ``path`` with its suffix replaced by :data:`PARTIAL_SUFFIX`, so
    readers that look for ``.png`` or ``.txt`` files never see it. ``sync=False`` leaves the
    rename to be made durable by the caller (:func:`sync_folder`, once for many files).
    """
    partial = path.with_suffix(PARTIAL_SUFFIX)
    try:
        with partial.open(mode) as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)  # a full disk or an interrupt: no debris
        raise
    if sync:
        sync_folder(path.parent)


def sync_folder(folder: Path) -> None:
    """Makes a rename in ``folder`` durable (POSIX; elsewhere folders cannot be opened)."""
    if os.name == "posix":
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
