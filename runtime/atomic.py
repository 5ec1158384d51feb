"""All-or-nothing file writes: a user's workspace or stats file is never left half-written.

with staged_files() as stage:
    torch.save(obj, stage(work_dir / "key_stats.pth"))   # writes key_stats.pth.tmp
    ...                                                  # more files
# every *.tmp is renamed over its final name only if the whole block succeeded;
# on any error the *.tmp files are removed and the previous files stay as they were.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


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
        for tmp, final in pairs:
            os.replace(tmp, final)
    finally:
        for tmp, _ in pairs:
            tmp.unlink(missing_ok=True)
