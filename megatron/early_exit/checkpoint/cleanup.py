"""Remove what interrupted saves left in a checkpoint directory (called after a committed save).

    removed = remove_stale_saves(save_dir)     # rank 0 only, after commit() has returned

A save that is killed part-way leaves, beside the committed checkpoints (checkpoint/format.py):

- ``iter_XXXXXXX.tmp-<nonce>/``: a save that never reached its rename (never loaded: it has no
  tracker entry, usually no metadata);
- ``iter_XXXXXXX.old-<nonce>/``: the previous copy of an iteration moved aside while it was being
  replaced (only where the atomic directory exchange is not supported);
- ``latest_checkpointed_iteration.txt.tmp-<nonce>``: a tracker update that never reached its rename.

Once a new save has committed, the temporary ones are garbage: they are deleted, with one line
on stderr each. An ``.old-`` copy is deleted only when its iteration is committed again (the
directory exists); if it is the only copy of that iteration, ``locate_iteration_dir`` may still
need it, so it is kept and reported instead. Errors while deleting are reported, never raised:
the save itself has already succeeded.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import List

from megatron.early_exit.checkpoint import format as fmt


def _is_temporary(name: str) -> bool:
    return ((name.startswith("iter_") and ".tmp-" in name)
            or name.startswith(fmt.TRACKER + ".tmp-"))


def _notice(message: str) -> None:
    print(f"checkpoint cleanup: {message}", file=sys.stderr, flush=True)


def _remove(path: str) -> bool:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    except OSError as e:
        _notice(f"could not remove {path}: {e}")
        return False
    return True


def remove_stale_saves(root: str) -> List[str]:
    """Delete the leftovers of interrupted saves in ``root``; returns the names removed."""
    removed = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if _is_temporary(name):
            reason = "left by an interrupted save"
        elif name.startswith("iter_") and ".old-" in name:
            committed = os.path.join(root, name.split(".old-")[0])
            if not os.path.isdir(committed):
                _notice(f"kept {path}: the only copy of {os.path.basename(committed)} "
                        "(moved aside by an interrupted save)")
                continue
            reason = f"an older copy of {os.path.basename(committed)}, moved aside by an interrupted save"
        else:
            continue
        if _remove(path):
            _notice(f"removed {path} ({reason})")
            removed.append(name)
    return removed
