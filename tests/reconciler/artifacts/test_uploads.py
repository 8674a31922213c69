"""UploadManager.sessions: the open upload sessions, read only (the dashboard lists them)."""

from __future__ import annotations

import os
from pathlib import Path

from modelfleet.reconciler.artifacts.store import ArtifactStore
from modelfleet.reconciler.artifacts.uploads import UploadManager


def test_sessions_lists_open_uploads_with_their_offset_newest_first(tmp_path: Path) -> None:
    manager = UploadManager(ArtifactStore(tmp_path / "state"))
    assert manager.sessions() == []
    first = manager.create("a.mar", size=100)
    second = manager.create("b.mar")
    appender = manager.appender(first.id, 0)
    appender.write(b"x" * 40)
    appender.close()
    os.utime(manager.dir / f"{second.id}.json", (1, 1))
    os.utime(manager.dir / f"{second.id}.part", (1, 1))
    (manager.dir / ".stray.tmp").write_text("{}")  # a half-written meta file is not a session
    (manager.dir / "broken.json").write_text("not json")  # nor an unreadable one
    sessions = manager.sessions()
    assert [(s.name, s.offset, s.size) for s in sessions] == [("a.mar", 40, 100), ("b.mar", 0, None)]
    manager.abort(first.id)
    assert [s.name for s in manager.sessions()] == ["b.mar"]
