"""All-or-nothing file writes: a user's workspace or stats file is never left half-written.

with staged_files() as stage:
    torch.save(obj, stage(work_dir / "key_stats.pth"))   # writes key_stats.pth.tmp
    ...                                                  # more files
# every *.tmp is renamed over its final name only if the whole block succeeded;
# on any error the *.tmp files are removed and the previous files stay as they were.

The renames run with Ctrl-C held (`runtime.interrupts.held`), so an interrupt never leaves some files
new and others old; the final names are recorded for the command's "interrupted: ..." message.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from runtime import interrupts


@contextmanager
def staged_files() -> Iterator[Callable[[Path], Path]]:
    """Yield stage(final) -> temp path to write; rename all temps into place when the block succeeds."""
    pairs: list[tuple[Path, Path]] = []

    def stage(final: Path) -> Path:
        final = Path(final)
        tmp = final.with_name(final.name + ".tmp")
        pairs.append((tmp, final))
        return tmp

    try:
        yield stage
        with interrupts.held():
            for tmp, final in pairs:
                os.replace(tmp, final)
            for _, final in pairs:
                interrupts.record(str(final))
    finally:
        for tmp, _ in pairs:
            tmp.unlink(missing_ok=True)
