"""Artifact store: ``<root>/artifacts/<stage>/<key>/`` with ``config.json`` and a completion marker.

Writes are atomic: a stage writes into a private temporary folder; on success the folder becomes
the artifact (an atomic rename on local file systems, an upload on object stores) and the marker
``_SUCCESS`` is written last. Readers only use artifacts whose marker exists, so a half-written
artifact is never read; an exception mid-write leaves no trace under the final name.

Local paths and fsspec URIs (``s3://``, ``gs://``, ``file://`` ...) are supported; remote artifacts
are downloaded to a local cache before use.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

import fsspec

MARKER = "_SUCCESS"
CONFIG = "config.json"


def _is_local(root: str) -> bool:
    return "://" not in root or root.startswith("file://")


def _strip_file(root: str) -> str:
    return root[len("file://"):] if root.startswith("file://") else root


class ArtifactStore:
    """Content-addressed stage artifacts under one storage root."""

    def __init__(self, root: str | os.PathLike, cache_dir: str | os.PathLike | None = None):
        self.root = str(root).rstrip("/")
        self.local = _is_local(self.root)
        if self.local:
            self.root = os.path.abspath(os.path.expanduser(_strip_file(self.root)))
            self.fs = fsspec.filesystem("file")
        else:
            self.fs, _ = fsspec.core.url_to_fs(self.root)
        self.cache_dir = Path(cache_dir or os.environ.get("DIFFMI_RAY_CACHE",
                                                          Path.home() / ".cache" / "diffmi_ray" / "artifacts"))

    # ------------------------------------------------------------------ paths
    def uri(self, stage: str, key: str) -> str:
        return f"{self.root}/artifacts/{stage}/{key}"

    def checkpoint_dir(self, stage: str, key: str) -> str:
        """Persistent folder for a stage's resumable state (kept until the artifact is committed)."""
        return f"{self.root}/checkpoints/{stage}/{key}"

    def is_done(self, stage: str, key: str) -> bool:
        return self.fs.exists(f"{self.uri(stage, key)}/{MARKER}")

    def read_config(self, stage: str, key: str) -> dict:
        with self.fs.open(f"{self.uri(stage, key)}/{CONFIG}", "r") as f:
            return json.load(f)

    def local_path(self, stage: str, key: str) -> Path:
        """A local folder with the finished artifact (downloaded to the cache for remote stores)."""
        if not self.is_done(stage, key):
            raise FileNotFoundError(f"artifact {stage}/{key} is not finished in {self.root}")
        if self.local:
            return Path(self.uri(stage, key))
        dest = self.cache_dir / hashlib.sha256(self.root.encode()).hexdigest()[:12] / stage / key
        if not (dest / MARKER).exists():
            tmp = dest.parent / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
            self.fs.get(self.uri(stage, key) + "/", str(tmp), recursive=True)
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        return dest

    # ------------------------------------------------------------------ writing
    @contextlib.contextmanager
    def writer(self, stage: str, key: str, config: dict) -> Iterator[Path]:
        """Yield a private local folder; on normal exit it becomes the artifact ``stage/key``.

        ``config`` (the resolved stage config) is written as ``config.json``; the marker comes last.
        On an exception the folder is removed and nothing appears under the final name.
        """
        if self.local:
            base = Path(self.root) / "artifacts" / stage
            base.mkdir(parents=True, exist_ok=True)
            tmp = base / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
        else:
            tmp = Path(tempfile.mkdtemp(prefix=f"diffmi-{stage}-{key}-"))
        try:
            yield tmp
            (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
            self._commit(tmp, stage, key)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _commit(self, tmp: Path, stage: str, key: str) -> None:
        final = self.uri(stage, key)
        if self.local:
            if os.path.exists(final):  # an earlier commit died between rename and marker
                if os.path.exists(os.path.join(final, MARKER)):
                    return  # finished by someone else meanwhile; keep theirs
                shutil.rmtree(final)
            os.replace(tmp, final)
            marker_tmp = os.path.join(final, f".{MARKER}.tmp")
            with open(marker_tmp, "w") as f:
                f.write("ok\n")
            os.replace(marker_tmp, os.path.join(final, MARKER))
        else:
            if self.fs.exists(final):
                if self.fs.exists(f"{final}/{MARKER}"):
                    return
                self.fs.rm(final, recursive=True)
            self.fs.put(str(tmp) + "/", final, recursive=True)
            with self.fs.open(f"{final}/{MARKER}", "w") as f:
                f.write("ok\n")
        self.clear_checkpoints(stage, key)

    def clear_checkpoints(self, stage: str, key: str) -> None:
        ck = self.checkpoint_dir(stage, key)
        if self.fs.exists(ck):
            self.fs.rm(ck, recursive=True)

    # ------------------------------------------------------------------ listing
    def done_keys(self, stage: str) -> set[str]:
        base = f"{self.root}/artifacts/{stage}"
        if not self.fs.exists(base):
            return set()
        out = set()
        for p in self.fs.ls(base, detail=False):
            name = p.rstrip("/").rsplit("/", 1)[-1]
            if not name.startswith(".") and self.fs.exists(f"{p}/{MARKER}"):
                out.add(name)
        return out

    # ------------------------------------------------------------------ grid outputs
    def grid_dir(self, grid_name: str) -> str:
        return f"{self.root}/{grid_name}"

    def write_text(self, path: str, text: str) -> None:
        """Atomically write a text file anywhere under the root (temp file + rename/upload)."""
        self.write_bytes(path, text.encode())

    def write_bytes(self, path: str, data: bytes) -> None:
        """Atomically write a file anywhere under the root (temp file + rename locally, one put remotely)."""
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        else:
            with self.fs.open(path, "wb") as f:
                f.write(data)
