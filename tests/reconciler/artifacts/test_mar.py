"""validate_mar: real archives pass; each kind of bad archive is refused naming the archive and entry."""

from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path

import pytest

from modelfleet.reconciler.artifacts.errors import InvalidArtifact
from modelfleet.reconciler.artifacts.mar import MarLimits, validate_mar
from tests.reconciler.artifacts.archives import GOOD_MANIFEST, build_mar, crafted_zip

HANDLER = b"def handle(data, context):\n    return data\n"
MODEL = b"\x80\x02weights" * 100


def test_archive_built_by_torch_model_archiver(good_mar: Path) -> None:
    info = validate_mar(good_mar)
    assert (info.model_name, info.handler, info.serialized_file, info.model_file, info.version) == \
        ("tiny", "handler.py", "model.pt", None, "1.0")
    assert info.manifest["archiverVersion"] == "0.12.0" and info.manifest["runtime"] == "python"
    assert set(info.files) == {"MAR-INF/MANIFEST.json", "handler.py", "model.pt"}


def test_archive_with_model_file_and_default_handler(mar_dir: Path) -> None:
    eager = validate_mar(build_mar(mar_dir / "eager", "eager", "2.1", model_file=True))
    assert (eager.model_file, eager.version) == ("tiny_model.py", "2.1")
    default = validate_mar(build_mar(mar_dir / "default", "classifier", handler="image_classifier",
                                     archive_format="zip-store"))
    assert default.handler == "image_classifier" and "handler.py" not in default.files


def _manifest(**model: object) -> dict[str, object]:
    return {**GOOD_MANIFEST, "model": {**GOOD_MANIFEST["model"], **model}}


def test_module_path_handler_is_accepted(tmp_path: Path) -> None:
    path = crafted_zip(tmp_path / "m.mar", {"model.pt": MODEL}, _manifest(handler="acme.handlers.tiny:handle"))
    assert validate_mar(path).handler == "acme.handlers.tiny:handle"


BAD = [
    # (case, entries, manifest, expected message fragment)
    ("traversal", {"model.pt": MODEL, "handler.py": HANDLER, "../evil.py": b"x"}, GOOD_MANIFEST,
     "entry '../evil.py': path traversal"),
    ("nested-traversal", {"model.pt": MODEL, "handler.py": HANDLER, "a/../../evil": b"x"}, GOOD_MANIFEST,
     "entry 'a/../../evil': path traversal"),
    ("backslash-traversal", {"model.pt": MODEL, "handler.py": HANDLER, "..\\evil": b"x"}, GOOD_MANIFEST,
     "path traversal"),
    ("absolute", {"model.pt": MODEL, "handler.py": HANDLER, "/etc/cron.d/evil": b"x"}, GOOD_MANIFEST,
     "entry '/etc/cron.d/evil': absolute path"),
    ("drive", {"model.pt": MODEL, "handler.py": HANDLER, "C:/evil": b"x"}, GOOD_MANIFEST, "absolute path"),
    ("no-manifest", {"model.pt": MODEL, "handler.py": HANDLER}, None, "no MAR-INF/MANIFEST.json"),
    ("missing-handler", {"model.pt": MODEL}, GOOD_MANIFEST, "handler 'handler.py' (model.handler) is not in"),
    ("unknown-handler", {"model.pt": MODEL}, _manifest(handler="my_handler"),
     "handler 'my_handler' (model.handler) is neither a file in the archive nor a TorchServe default handler"),
    ("missing-serialized", {"handler.py": HANDLER}, GOOD_MANIFEST,
     "model.serializedFile names 'model.pt', which is not in the archive"),
    ("missing-model-file", {"handler.py": HANDLER, "model.pt": MODEL}, _manifest(modelFile="arch.py"),
     "model.modelFile names 'arch.py'"),
    ("bad-model-name", {"handler.py": HANDLER, "model.pt": MODEL}, _manifest(modelName="../../x"),
     "model.modelName '../../x' is not a valid model name"),
    ("no-model-name", {"handler.py": HANDLER, "model.pt": MODEL}, _manifest(modelName=None),
     "model.modelName is missing"),
    ("no-model", {"handler.py": HANDLER}, {"runtime": "python"}, "no \"model\" object"),
]


@pytest.mark.parametrize(("case", "entries", "manifest", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_archives(tmp_path: Path, case: str, entries: dict[str, bytes], manifest: dict[str, object] | None,
                      message: str) -> None:
    path = crafted_zip(tmp_path / f"{case}.mar", entries, manifest)
    with pytest.raises(InvalidArtifact) as raised:
        validate_mar(path)
    assert str(raised.value).startswith(f"{case}.mar: ")
    assert message in str(raised.value)


def test_symlink_entry(tmp_path: Path) -> None:
    path = crafted_zip(tmp_path / "link.mar", {"model.pt": MODEL, "handler.py": HANDLER},
                       symlinks={"weights.bin": "/etc/shadow"})
    with pytest.raises(InvalidArtifact, match=r"link.mar: entry 'weights.bin': symbolic link"):
        validate_mar(path)


def test_manifest_not_json(tmp_path: Path) -> None:
    path = tmp_path / "json.mar"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("MAR-INF/MANIFEST.json", "{not json")
    with pytest.raises(InvalidArtifact, match=r"json.mar: entry 'MAR-INF/MANIFEST.json' is not valid JSON"):
        validate_mar(path)


def test_truncated_archive(tmp_path: Path, good_mar: Path) -> None:
    data = good_mar.read_bytes()
    for cut in (len(data) - 10, len(data) // 2, 100):
        path = tmp_path / "cut.mar"
        path.write_bytes(data[:cut])
        with pytest.raises(InvalidArtifact, match=r"cut.mar: not a zip archive, or truncated or corrupt"):
            validate_mar(path)


def test_not_a_zip(tmp_path: Path) -> None:
    path = tmp_path / "random.mar"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(InvalidArtifact, match=r"random.mar: not a zip archive"):
        validate_mar(path)
    with pytest.raises(InvalidArtifact, match=r"missing.mar: cannot read the archive"):
        validate_mar(tmp_path / "missing.mar")


def test_corrupt_handler_crc(tmp_path: Path) -> None:
    handler = b"# a handler long enough to corrupt\n" * 20
    path = crafted_zip(tmp_path / "crc.mar", {"model.pt": MODEL, "handler.py": handler}, method=zipfile.ZIP_STORED)
    data = bytearray(path.read_bytes())
    at = data.find(handler)
    data[at + 40] ^= 0xFF  # flip a byte of the stored handler: the CRC no longer matches
    path.write_bytes(bytes(data))
    with pytest.raises(InvalidArtifact, match=r"crc.mar: entry 'handler.py' is corrupt: Bad CRC-32"):
        validate_mar(path)


def test_bomb_by_compression_ratio(tmp_path: Path) -> None:
    path = crafted_zip(tmp_path / "bomb.mar", {"model.pt": MODEL, "handler.py": HANDLER,
                                               "zeros.bin": b"\0" * (16 << 20)})
    with pytest.raises(InvalidArtifact, match=r"bomb.mar: entry 'zeros.bin': compression ratio \d+:1 exceeds"):
        validate_mar(path)


def test_bomb_by_total_size_and_entry_count(tmp_path: Path) -> None:
    entries = {"model.pt": MODEL, "handler.py": HANDLER, **{f"part{i}.bin": os.urandom(1000) for i in range(8)}}
    path = crafted_zip(tmp_path / "many.mar", entries)
    with pytest.raises(InvalidArtifact, match=r"many.mar: 11 entries, more than the limit of 5"):
        validate_mar(path, MarLimits(max_entries=5))
    with pytest.raises(InvalidArtifact, match=r"many.mar: uncompressed size exceeds the limit of 4.0 KiB at entry"):
        validate_mar(path, MarLimits(max_total_size=4096))
    assert validate_mar(path).entries == 11


def test_overlapping_entries(tmp_path: Path) -> None:
    """A central directory that says an entry's data is longer than the space before the next one."""
    path = crafted_zip(tmp_path / "overlap.mar", {"model.pt": MODEL, "handler.py": HANDLER},
                       method=zipfile.ZIP_STORED)
    data = bytearray(path.read_bytes())
    central = data.find(b"PK\x01\x02")  # the first central header: the manifest's
    (compressed,) = struct.unpack_from("<L", data, central + 20)
    (size,) = struct.unpack_from("<L", data, central + 24)
    struct.pack_into("<L", data, central + 20, compressed + 300)
    struct.pack_into("<L", data, central + 24, size + 300)
    path.write_bytes(bytes(data))
    with pytest.raises(InvalidArtifact, match=r"overlap.mar: entry 'MAR-INF/MANIFEST.json': data overlaps"):
        validate_mar(path)


def test_duplicate_entries(tmp_path: Path) -> None:
    path = tmp_path / "dup.mar"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("MAR-INF/MANIFEST.json", json.dumps(GOOD_MANIFEST))
        zf.writestr("handler.py", HANDLER)
        zf.writestr("model.pt", MODEL)
        with pytest.warns(UserWarning, match="Duplicate name"):
            zf.writestr("handler.py", b"import os; os.system('evil')")
    with pytest.raises(InvalidArtifact, match=r"dup.mar: entry 'handler.py' appears twice"):
        validate_mar(path)


def test_display_name_replaces_the_path(tmp_path: Path) -> None:
    path = crafted_zip(tmp_path / "tmp-upload-123", {"model.pt": MODEL}, GOOD_MANIFEST)
    with pytest.raises(InvalidArtifact, match=r"^my-model.mar: handler"):
        validate_mar(path, display_name="my-model.mar")
