"""On-disk layout of our checkpoints: names, hashed writes, the manifest, the atomic commit.

A checkpoint directory looks like::

    <dir>/latest_checkpointed_iteration.txt     "100\\n", written last (temp file + os.replace)
    <dir>/iter_0000100/
        metadata.json                           see checkpoint/save.py; sealed by its own sha256
        model_tp00_pp000.pt                     one per (tp, pp) rank with dp_rank 0
        optim_tp00_pp000.pt                     the same, AdamW state (absent if model only)
        rng_rank00000.pt                        one per global rank (absent after resharding)
        tokenizer/...                           optional copies of the tokenizer files

Every file except ``metadata.json`` is listed in the metadata's ``files`` manifest with its size
and sha256. A save writes everything into ``iter_0000100.tmp-<nonce>/`` and ``commit`` renames
it into place only after checking the manifest, so a crash leaves either the previous
checkpoint as latest or the new one complete. Readers raise ``CheckpointError`` naming the file
and what is wrong with it.

    size, digest = write_torch_file(path, obj)
    commit(save_dir, tmp_dir, iteration, metadata)
    it_dir = iteration_dir(load_dir, resolve_iteration(load_dir))
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import uuid
import warnings
from typing import Dict, Optional

import torch

FORMAT_VERSION = 1
TRACKER = "latest_checkpointed_iteration.txt"
METADATA = "metadata.json"
TOKENIZER_DIR = "tokenizer"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, partial, corrupt or does not fit the model being loaded."""


def iteration_name(iteration: int) -> str:
    return f"iter_{int(iteration):07d}"


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, iteration_name(iteration))


def model_file(tp_rank: int, pp_rank: int) -> str:
    return f"model_tp{tp_rank:02d}_pp{pp_rank:03d}.pt"


def optim_file(tp_rank: int, pp_rank: int) -> str:
    return f"optim_tp{tp_rank:02d}_pp{pp_rank:03d}.pt"


def rng_file(global_rank: int) -> str:
    return f"rng_rank{global_rank:05d}.pt"


def new_nonce() -> str:
    return uuid.uuid4().hex[:12]


# ------------------------------------------------------------------------------ hashed writes
class _HashingWriter:
    """File-like object that hashes and counts what torch.save writes through it."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def write_torch_file(path: str, obj) -> tuple:
    """torch.save ``obj`` to ``path``, fsync it; returns (size, sha256 hex) of the bytes written."""
    with open(path, "wb") as f:
        writer = _HashingWriter(f)
        torch.save(obj, writer)
        f.flush()
        os.fsync(f.fileno())
    return writer.size, writer.sha.hexdigest()


def sha256_file(path: str, block: int = 1 << 22) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for data in iter(lambda: f.read(block), b""):
            sha.update(data)
    return sha.hexdigest()


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` via a fsynced temp file and os.replace."""
    tmp = f"{path}.tmp-{new_nonce()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


# ------------------------------------------------------------------------------ metadata
def _seal_digest(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != "metadata_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_metadata(dir_path: str, meta: dict) -> None:
    meta = dict(meta, metadata_sha256=_seal_digest(meta))
    path = os.path.join(dir_path, METADATA)
    with open(path, "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def read_metadata(dir_path: str) -> dict:
    path = os.path.join(dir_path, METADATA)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {dir_path} has no {METADATA} (incomplete or not ours)")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not valid JSON (truncated or corrupt): {e}") from e
    if meta.get("metadata_sha256") != _seal_digest(meta):
        raise CheckpointError(f"{path} does not match its own sha256 seal (edited or corrupt)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {meta.get('format_version')!r}; "
                              f"this code reads version {FORMAT_VERSION}")
    return meta


def check_file(dir_path: str, rel: str, manifest: Dict[str, dict], hash_it: bool) -> str:
    """Path of manifest entry ``rel`` after checking it exists, its size and (opt.) sha256."""
    path = os.path.join(dir_path, rel)
    entry = manifest.get(rel)
    if entry is None:
        raise CheckpointError(f"{path} is not listed in the checkpoint manifest")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path} is missing")
    size = os.path.getsize(path)
    if size != entry["size"]:
        raise CheckpointError(f"checkpoint file {path} has {size} bytes, the manifest says "
                              f"{entry['size']} (truncated or partially written)")
    if hash_it and sha256_file(path) != entry["sha256"]:
        raise CheckpointError(f"checkpoint file {path} fails its sha256 check (corrupt)")
    return path


def check_manifest(dir_path: str, manifest: Dict[str, dict], hash_all: bool = False) -> None:
    """Every manifest file exists with its recorded size (and sha256 when ``hash_all``)."""
    for rel in sorted(manifest):
        check_file(dir_path, rel, manifest, hash_all)


# ------------------------------------------------------------------------------ tracker
def read_tracker(root: str) -> Optional[int]:
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(f"{path} should hold an iteration number, holds {text[:40]!r}") from None


def _incomplete_saves(root: str) -> list:
    if not os.path.isdir(root):
        return []
    return sorted(n for n in os.listdir(root) if n.startswith("iter_") and ".tmp-" in n)


def resolve_iteration(root: str, iteration: Optional[int] = None) -> int:
    """The iteration to load: ``iteration`` if given, else the one ``TRACKER`` names."""
    if not os.path.isdir(root):
        raise CheckpointError(f"checkpoint directory {root} does not exist")
    if iteration is None:
        iteration = read_tracker(root)
        if iteration is None:
            partial = _incomplete_saves(root)
            hint = (f"; found only incomplete saves {partial} (interrupted before commit)"
                    if partial else "")
            raise CheckpointError(f"no {TRACKER} in {root}: no complete checkpoint{hint}")
    return int(iteration)


def locate_iteration_dir(root: str, iteration: int) -> str:
    """Directory of a committed iteration, or a copy moved aside by an interrupted replace."""
    path = iteration_dir(root, iteration)
    if os.path.isdir(path):
        return path
    prefix = iteration_name(iteration) + ".old-"
    moved = sorted(n for n in os.listdir(root) if n.startswith(prefix))
    if moved:
        warnings.warn(f"{path} is missing; using {moved[-1]}, moved aside by an interrupted save")
        return os.path.join(root, moved[-1])
    partial = [n for n in _incomplete_saves(root) if n.startswith(iteration_name(iteration))]
    hint = f" (only incomplete saves: {partial})" if partial else ""
    raise CheckpointError(f"iteration {iteration} is not in {root}: {path} does not exist{hint}")


# ------------------------------------------------------------------------------ commit
_RENAME_EXCHANGE = 2


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two directories (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def _move_into_place(tmp_dir: str, final: str) -> None:
    if not os.path.exists(final):
        os.replace(tmp_dir, final)
        return
    if _exchange(tmp_dir, final):  # tmp_dir now holds the old checkpoint
        shutil.rmtree(tmp_dir, ignore_errors=True)
        return
    aside = f"{final}.old-{new_nonce()}"  # locate_iteration_dir falls back to it after a crash
    os.replace(final, aside)
    os.replace(tmp_dir, final)
    shutil.rmtree(aside, ignore_errors=True)


def commit(root: str, tmp_dir: str, iteration: int, meta: dict) -> str:
    """Verify ``tmp_dir`` against ``meta['files']``, seal the metadata, rename, point latest."""
    check_manifest(tmp_dir, meta["files"])
    write_metadata(tmp_dir, meta)
    fsync_dir(tmp_dir)
    final = iteration_dir(root, iteration)
    _move_into_place(tmp_dir, final)
    fsync_dir(root)
    write_text_atomic(os.path.join(root, TRACKER), f"{int(iteration)}\n")
    return final
