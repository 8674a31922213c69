"""`modelfleet release` (promote a deployment's pinned origin and runtime to another environment) and
`modelfleet confirm` (confirm the deletions a commit's pass holds).

A release works in a clone of the manifest repository: it copies the source environment's origin,
pinned (a HuggingFace revision as its 40-character commit, a file origin as its sha256), and its
runtime into the target environment's deployment of the same model, editing only those two keys
of that deployment in place (every other line of the file, comments included, stays as it was:
a line/column edit at the positions PyYAML's composer reports, no YAML round-trip library), then
commits that file, on a new branch and pushed with --push.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from modelfleet.state.loader import Catalog, DeploymentEntry, load_tree

EXIT_OK, EXIT_INVALID, EXIT_USAGE, EXIT_RUNTIME = 0, 1, 2, 3
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_GIT_ENV = {"GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C", "LANGUAGE": "C"}


class ReleaseError(Exception):
    """A release that cannot be made: the message names the file (and line) and the fix."""


def _fail(message: str) -> None:
    import sys

    sys.stderr.write(f"modelfleet: {message}\n")


# --- the daemon API (confirm, and the HF commits of `release`) ------------------------------------


def _api_base_and_token(config_path: str | None, api: str | None) -> tuple[str, str | None]:
    from modelfleet.reconciler.config import ConfigError, load_config, local_url
    from modelfleet.reconciler.secrets import read_secret

    token = None
    base = api
    if config_path:
        try:
            config = load_config(config_path)
        except ConfigError as exc:
            raise ReleaseError(str(exc)) from None
        base = base or local_url(config.api.listen)
        token = read_secret(config.api.token_file)
    return (base or "http://127.0.0.1:8081").rstrip("/"), token


def cmd_confirm(args: argparse.Namespace) -> int:
    import httpx

    from modelfleet.state.safety import valid_sha

    sha = args.sha.strip().lower()
    if not valid_sha(sha):
        _fail(f"{args.sha!r} is not a commit id: give 7 to 40 hex digits (the sha the held status names)")
        return EXIT_USAGE
    try:
        base, token = _api_base_and_token(args.config, args.api)
    except ReleaseError as exc:
        _fail(str(exc))
        return EXIT_INVALID
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.post(f"{base}/api/v1/confirm/{sha}", headers=headers, timeout=10, trust_env=False)
    except httpx.HTTPError as exc:
        _fail(f"cannot reach the daemon API at {base}: {exc}")
        return EXIT_RUNTIME
    if response.status_code != 202:
        _fail(f"{base}/api/v1/confirm/{sha} answered {response.status_code}: {response.text[:300]}")
        return EXIT_RUNTIME
    print(f"confirmed the deletions of {sha}: a pass is queued")
    return EXIT_OK


def _deployed_commit(args: argparse.Namespace, model: str, environment: str) -> str | None:
    """The HuggingFace commit the daemon deployed for (model, environment), when it can be asked."""
    if not (args.config or args.api):
        return None
    import httpx

    try:
        base, token = _api_base_and_token(args.config, args.api)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        response = httpx.get(f"{base}/api/v1/status", headers=headers, timeout=10, trust_env=False)
        data = response.json() if response.status_code == 200 else {}
    except (httpx.HTTPError, ValueError, ReleaseError):
        return None
    for item in data.get("deployments") or []:
        if item.get("model") == model and item.get("environment") == environment:
            origin = item.get("origin") or {}
            commit = (origin.get("huggingface") or {}).get("commit")
            return commit if isinstance(commit, str) and _COMMIT.match(commit) else None
    return None


# --- what to promote ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Promotion:
    model: str
    source: str
    target: str
    file: str  # the target deployment's file, relative to the repository
    origin: dict[str, Any] | None  # pinned, as written into the target
    runtime: dict[str, Any] | None  # as written in the source deployment
    summary: str  # "origin sha256:abcd..., runtime torch"

    @property
    def short(self) -> str:
        """A short id of what is promoted (branch names)."""
        if self.origin is None:
            text = json.dumps(self.runtime, sort_keys=True)
            import hashlib

            return hashlib.sha256(text.encode()).hexdigest()[:8]
        if "file" in self.origin:
            return str(self.origin["file"]["sha256"]).removeprefix("sha256:")[:8]
        return str(self.origin["huggingface"]["revision"])[:8]


def _deployment(catalog: Catalog, repo: Path, model: str, environment: str) -> DeploymentEntry:
    entry = catalog.models.get(model)
    if entry is None:
        known = ", ".join(sorted(catalog.models)[:10]) or "none"
        raise ReleaseError(f"{repo}: no Model named {model!r} in the repository (models: {known})")
    for deployment in entry.deployments:
        if deployment.environment == environment:
            return deployment
    envs = ", ".join(d.environment for d in entry.deployments) or "none"
    raise ReleaseError(f"{entry.source.where}: model {model} has no deployment in environment {environment!r} "
                       f"(it has: {envs}); add one there first (a release keeps the target's policies, flavors "
                       "and replicas, so it needs a deployment to update)")


def _raw(entry: DeploymentEntry, text: str) -> dict[str, Any]:
    """The deployment as written (the loader keeps only the validated models), from its file's text."""
    from modelfleet.state.yaml_source import parse_documents

    for doc in parse_documents(text):
        if doc.start_line == entry.source.doc.start_line:
            data: Any = doc.data
            for part in entry.source.base:
                data = data[part]
            return dict(data)
    raise ReleaseError(f"{entry.source.where}: the deployment could not be read again from its file")


def plan_promotion(repo: Path, model: str, source: str, target: str, deployed_commit: str | None = None) -> Promotion:
    """What a release copies, from the repository's manifests (pure but for reading the files)."""
    from modelfleet.reconciler.source.tree import DirectoryTree
    from modelfleet.state.desired import compute_desired

    if source == target:
        raise ReleaseError(f"--from and --to are both {source!r}: give two different environments")
    tree = DirectoryTree(repo)
    catalog = load_tree(tree)
    src = _deployment(catalog, repo, model, source)
    dst = _deployment(catalog, repo, model, target)
    for entry, role in ((src, "source"), (dst, "target")):
        if not entry.valid:
            first = entry.errors[0] if entry.errors else f"{entry.source.where}: invalid deployment"
            raise ReleaseError(f"the {role} deployment {model}/{entry.environment} is not valid: {first}")
    assert src.spec is not None
    raw = _raw(src, (repo / src.source.file).read_text(encoding="utf-8"))
    origin: dict[str, Any] | None = None
    described = "no origin"
    spec_origin = src.spec.origin
    if spec_origin is not None and spec_origin.huggingface is not None:
        hf = spec_origin.huggingface
        commit = hf.revision if _COMMIT.match(hf.revision) else deployed_commit
        if commit is None:
            line = src.source.line("origin", "huggingface", "revision")
            raise ReleaseError(
                f"{src.source.file}:{line}: origin.huggingface.revision {hf.revision!r} of {model}/{source} is not "
                "pinned to a commit, and the commit the daemon deployed is not known: pin it in the manifest "
                "(revision: <40-character commit>), or give --config/--api so that the daemon's status says "
                "which commit it resolved to")
        origin = {"huggingface": {"model": hf.model, "revision": commit}}
        described = f"origin hf:{hf.model}@{commit[:12]}"
    elif spec_origin is not None and spec_origin.file is not None:
        digest = spec_origin.file.digest or catalog.artifact_digests.get(spec_origin.file.path or "")
        if digest is None:
            line = src.source.line("origin", "file")
            raise ReleaseError(f"{src.source.file}:{line}: origin.file of {model}/{source}: "
                               f"{spec_origin.file.path!r} is not in the repository, so it has no sha256 to pin")
        origin = {"file": {"sha256": f"sha256:{digest}"}}
        described = f"origin sha256:{digest[:12]}..."
    runtime = raw.get("runtime")
    state = compute_desired(catalog, [], "release").deployments.get((model, source))
    runtime_type = state.runtime.type if state is not None and state.runtime is not None else (
        (runtime or {}).get("type") or "suggested")
    return Promotion(model, source, target, dst.source.file, origin,
                     dict(runtime) if isinstance(runtime, dict) else None,
                     f"{described}, runtime {runtime_type}")


# --- the in-place edit ----------------------------------------------------------------------------


def _flow(value: Any) -> str:
    text: str = yaml.safe_dump([value], default_flow_style=True, width=2**30, sort_keys=False).strip()
    return text[1:-1]


def _block(key: str, value: Any, indent: int) -> list[str]:
    text: str = yaml.safe_dump({key: value}, default_flow_style=False, sort_keys=False, width=2**30)
    lines = text.rstrip("\n").split("\n")
    return [lines[0]] + [" " * indent + line for line in lines[1:]]


def _last_end(node: yaml.Node) -> tuple[int, int]:
    """Where a node's own text ends (line, column): its last scalar for a block collection (PyYAML's
    end mark of a block collection is the next token, past comments that belong to what follows)."""
    if isinstance(node, yaml.MappingNode | yaml.SequenceNode) and not node.flow_style and node.value:
        last = node.value[-1]
        return _last_end(last[1] if isinstance(last, tuple) else last)
    return node.end_mark.line, node.end_mark.column


def _target_node(text: str, start_line: int, base: tuple[str | int, ...]) -> yaml.MappingNode:
    for root in yaml.compose_all(text, Loader=yaml.SafeLoader):
        if root is None or root.start_mark.line + 1 != start_line:
            continue
        node: yaml.Node = root
        for part in base:
            if isinstance(part, int) and isinstance(node, yaml.SequenceNode):
                node = node.value[part]
            elif isinstance(node, yaml.MappingNode):
                node = next(v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == part)
            else:
                raise ReleaseError("the deployment could not be found again in its file")
        if not isinstance(node, yaml.MappingNode):
            raise ReleaseError("the deployment is not a mapping")
        return node
    raise ReleaseError("the deployment's document could not be found again in its file")


def edit_deployment(text: str, start_line: int, base: tuple[str | int, ...], updates: dict[str, Any]) -> str:
    """``text`` with the keys of ``updates`` set (value None: removed) in the deployment mapping at
    ``base`` of the document starting at ``start_line``; every other line stays as it was."""
    # One key at a time, composing the text again after each edit (positions move). A block
    # mapping that stays a mapping is edited key by key: only what changes changes (its comments,
    # anchors and style stay).
    for key, value in updates.items():
        current = _value_at(text, start_line, base)
        old = current.get(key) if isinstance(current, dict) else None
        if old == value:
            continue
        node = _target_node(text, start_line, base)
        found = next((v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == key), None)
        if (isinstance(value, dict) and value and isinstance(old, dict) and isinstance(found, yaml.MappingNode)
                and not found.flow_style and not node.flow_style):
            for gone in [k for k in old if k not in value]:
                text = _edit_one(text, start_line, (*base, key), gone, None)
            text = edit_deployment(text, start_line, (*base, key), value)
        else:
            text = _edit_one(text, start_line, base, key, value)
    return text


def _value_at(text: str, start_line: int, path: tuple[str | int, ...]) -> Any:
    from modelfleet.state.yaml_source import parse_documents

    for doc in parse_documents(text):
        if doc.start_line == start_line:
            data: Any = doc.data
            for part in path:
                data = data[part]
            return data
    return None


def _edit_one(text: str, start_line: int, base: tuple[str | int, ...], key: str, value: Any) -> str:
    node = _target_node(text, start_line, base)
    lines = text.split("\n")
    pairs = [(k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode)]
    found = next(((k, v) for k, v in pairs if k.value == key), None)
    if node.flow_style:
        # {environment: production, runtime: {...}}: a column edit inside the flow mapping.
        if found is not None:
            k, v = found
            if value is None:
                raise ReleaseError(f"cannot remove {key} from a flow-style deployment mapping: write it in block style")
            return _splice(lines, (v.start_mark.line, v.start_mark.column), (v.end_mark.line, v.end_mark.column),
                           [_flow(value)])
        if value is None:
            return text
        end = (node.end_mark.line, node.end_mark.column - 1)  # before the closing brace
        return _splice(lines, end, end, [f", {key}: {_flow(value)}"])
    if found is not None:
        k, v = found
        col = k.start_mark.column
        end = _within(lines, _last_end(v))
        if value is None:
            prefix = lines[k.start_mark.line][:col]
            if prefix.strip():
                raise ReleaseError(f"cannot remove {key}: it is the first key of its list item; move it down")
            rest = lines[end[0]][end[1]:].strip()
            kept = [lines[end[0]][end[1]:]] if rest and not rest.startswith("#") else []  # (its comment goes)
            return "\n".join(lines[:k.start_mark.line] + kept + lines[end[0] + 1:])
        if isinstance(v, yaml.ScalarNode) and isinstance(value, dict | list) and value:
            return _splice(lines, (k.start_mark.line, col), end, _block(key, value, col))
        if isinstance(v, yaml.ScalarNode) or v.flow_style:  # flow style stays flow style, on its line
            return _splice(lines, (v.start_mark.line, v.start_mark.column), end, [_flow(value)])
        return _splice(lines, (k.start_mark.line, col), end, _block(key, value, col))
    if value is None:
        return text
    # A new key after the mapping's last one, at the column of its keys.
    col = pairs[0][0].start_mark.column if pairs else node.start_mark.column
    end_line, _ = _within(lines, _last_end(node))
    new = [" " * col + line if i == 0 else line for i, line in enumerate(_block(key, value, col))]
    return "\n".join(lines[:end_line + 1] + new + lines[end_line + 1:])


def _within(lines: list[str], end: tuple[int, int]) -> tuple[int, int]:
    """An end mark at the start of a line (after a block scalar) is the end of the line before."""
    line, column = end
    if column == 0 and line > 0:
        return line - 1, len(lines[line - 1])
    return line, column


def _splice(lines: list[str], start: tuple[int, int], end: tuple[int, int], new: list[str]) -> str:
    """Replace the text from ``start`` to ``end`` (line, column) by ``new`` (lines: the first goes
    where ``start`` is, the last is followed by the rest of the end line)."""
    head = lines[start[0]][:start[1]]
    tail = lines[end[0]][end[1]:]
    replaced = list(new)
    replaced[0] = head + replaced[0]
    replaced[-1] = replaced[-1] + tail
    return "\n".join(lines[:start[0]] + replaced + lines[end[0] + 1:])


# --- git ------------------------------------------------------------------------------------------


def _git(repo: Path, *args: str, check: bool = True, env: Mapping[str, str] | None = None
         ) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {}), **_GIT_ENV}, timeout=120, check=False,
                          stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise ReleaseError(f"git {' '.join(args[:2])} failed in {repo}: {(proc.stderr or proc.stdout).strip()[-400:]}")
    return proc


@dataclass(frozen=True)
class Released:
    promotion: Promotion
    commit: str
    branch: str | None
    pushed: bool
    message: str


def release(repo: Path, model: str, source: str, target: str, *, push: bool = False, branch: str | None = None,
            remote: str = "origin", deployed_commit: str | None = None,
            git_env: Mapping[str, str] | None = None) -> Released:
    """Promote, commit (on ``branch``, or a release branch when pushing), and push if asked."""
    if _git(repo, "rev-parse", "--is-inside-work-tree", check=False).stdout.strip() != "true":
        raise ReleaseError(f"{repo}: not a git working tree (run release in a clone of the manifest repository, "
                           "or give --repo)")
    root = Path(_git(repo, "rev-parse", "--show-toplevel").stdout.strip())
    promotion = plan_promotion(root, model, source, target, deployed_commit)
    from modelfleet.reconciler.source.tree import DirectoryTree

    catalog = load_tree(DirectoryTree(root))
    dst = _deployment(catalog, root, model, target)
    path = root / promotion.file
    if _git(root, "status", "--porcelain", "--", promotion.file).stdout.strip():
        raise ReleaseError(f"{promotion.file} has uncommitted changes: commit or stash them first")
    original = path.read_text(encoding="utf-8")
    updated = edit_deployment(original, dst.source.doc.start_line, dst.source.base,
                              {"origin": promotion.origin, "runtime": promotion.runtime})
    _check_edit(root, promotion, updated, original)
    message = f"release {model}: {source} -> {target} ({promotion.summary})"
    if updated == original:
        raise ReleaseError(f"{promotion.file}: {model}/{target} already runs what {source} runs "
                           f"({promotion.summary}): nothing to release")
    if push and branch is None:
        branch = f"release/{model}-{target}-{promotion.short}"
    if branch is not None:
        _git(root, "switch", "-c", branch)
    path.write_text(updated, encoding="utf-8")
    _git(root, "commit", "-q", "-m", message, "--", promotion.file, env=git_env)
    commit = _git(root, "rev-parse", "HEAD").stdout.strip()
    if push:
        assert branch is not None
        _git(root, "push", "-q", remote, f"{branch}:refs/heads/{branch}", env=git_env)
    return Released(promotion, commit, branch, push, message)


class _Overlay(Mapping[str, bytes]):
    """A tree with one file's content replaced."""

    def __init__(self, tree: Mapping[str, bytes], path: str, content: bytes) -> None:
        self._tree, self._path, self._content = tree, path, content

    def __getitem__(self, key: str) -> bytes:
        return self._content if key == self._path else self._tree[key]

    def __iter__(self) -> Iterator[str]:
        yield from self._tree
        if self._path not in self._tree:
            yield self._path

    def __len__(self) -> int:
        return len(self._tree) + (self._path not in self._tree)

    def __contains__(self, key: object) -> bool:
        return key == self._path or key in self._tree


def _check_edit(root: Path, promotion: Promotion, updated: str, original: str) -> None:
    """The edited file loads, and says what the release meant it to (never commit a surprise)."""
    from modelfleet.reconciler.source.tree import DirectoryTree

    catalog = load_tree(_Overlay(DirectoryTree(root), promotion.file, updated.encode()))
    entry = catalog.models.get(promotion.model)
    target = next((d for d in entry.deployments if d.environment == promotion.target), None) if entry else None
    if target is None or not target.valid:
        why = (target.errors[0] if target is not None and target.errors else "the deployment is gone")
        raise ReleaseError(f"{promotion.file}: the edit would not load ({why}); the file was not changed")
    raw = _raw(target, updated)
    if raw.get("origin") != promotion.origin or raw.get("runtime") != promotion.runtime:
        raise ReleaseError(f"{promotion.file}: the edit did not produce the expected deployment; the file was "
                           "not changed (please report this with the file)")
    # Nothing else of the file changed (YAML anchors and aliases shared with other parts could).
    from modelfleet.state.yaml_source import parse_documents

    expected = [doc.data for doc in parse_documents(original)]
    after = [doc.data for doc in parse_documents(updated)]
    starts = [doc.start_line for doc in parse_documents(original)]
    where: Any = expected[starts.index(target.source.doc.start_line)] if target.source.doc.start_line in starts \
        else None
    for part in target.source.base:
        where = where[part] if where is not None else None
    if isinstance(where, dict):
        for key in ("origin", "runtime"):
            value = getattr(promotion, key)
            if value is None:
                where.pop(key, None)
            else:
                where[key] = value
    if where is None or expected != after:
        raise ReleaseError(f"{promotion.file}: editing {promotion.model}/{promotion.target} in place would change "
                           "other parts of the file (YAML anchors or aliases it shares with them?); the file was "
                           "not changed: write its origin and runtime without anchors, or edit it by hand")
    before = load_tree({promotion.file: original.encode()}).models.get(promotion.model)
    assert before is not None
    old = next(d for d in before.deployments if d.environment == promotion.target)
    kept = _raw(old, original)
    for key in ("policies", "flavors", "replicas", "serverless", "enabled", "environment"):
        if kept.get(key) != raw.get(key):
            raise ReleaseError(f"{promotion.file}: the edit changed {key} of {promotion.model}/{promotion.target}; "
                               "the file was not changed (please report this with the file)")


def cmd_release(args: argparse.Namespace) -> int:
    repo = Path(args.repo)
    if not repo.is_dir():
        _fail(f"{args.repo}: not a directory (give the path of a clone of the manifest repository)")
        return EXIT_USAGE
    try:
        released = release(repo, args.model, args.source, args.target, push=args.push, branch=args.branch,
                           remote=args.remote, deployed_commit=_deployed_commit(args, args.model, args.source))
    except ReleaseError as exc:
        _fail(str(exc))
        return EXIT_INVALID
    where = f" on branch {released.branch}" if released.branch else ""
    pushed = f", pushed to {args.remote}" if released.pushed else ""
    print(f"{released.message}\ncommitted {released.commit[:12]}{where}{pushed}")
    if released.pushed and released.branch and args.config:
        return _pull_request_for(args.config, released)
    return EXIT_OK


def open_pull_request(pulls: Any, branch: str, base: str, title: str, body: str) -> tuple[Any, bool]:
    """The open pull request from ``branch`` into ``base``: the one already open (False), or a new
    one (True). ``pulls`` is a status/pulls.py ForgePulls; StatusError when the forge refuses."""
    existing = pulls.find_open_pull(branch, base)
    if existing is not None:
        return existing, False
    return pulls.create_pull(branch, base, title, body), True


def _pull_request_for(config_path: str, released: Released) -> int:
    """With a forge ``status.provider`` in the daemon's config: a pull request for the pushed
    release branch into ``repo.branch`` (reused when one is open already), and its URL printed."""
    from modelfleet.reconciler.config import ConfigError, load_config
    from modelfleet.reconciler.status import StatusError
    from modelfleet.reconciler.status.pulls import pulls_from_settings

    assert released.branch is not None
    try:
        config = load_config(config_path)
        pulls = pulls_from_settings(config.status, config.repo.url)
    except (ConfigError, ValueError) as exc:
        _fail(f"{config_path}: no pull request opened for {released.branch}: {exc}")
        return EXIT_INVALID
    if pulls is None:
        return EXIT_OK  # git-notes: no forge to open a pull request on
    body = (f"{released.message}\n\nOpened by `modelfleet release`: merging it into `{config.repo.branch}` "
            "deploys it; modelfleet comments its plan here.")
    try:
        pull, created = open_pull_request(pulls, released.branch, config.repo.branch, released.message, body)
    except StatusError as exc:
        _fail(f"the branch {released.branch} is pushed, but opening its pull request failed: {exc}")
        return EXIT_RUNTIME
    finally:
        pulls.close()
    noun = "merge request" if pulls.forge == "gitlab" else "pull request"
    if created:
        print(f"opened {noun} #{pull.number}: {pull.url}")
    else:
        print(f"a {noun} is open for {released.branch} already: #{pull.number}: {pull.url} (reused)")
    return EXIT_OK


def add_release_parsers(sub: Any) -> None:
    p = sub.add_parser("release", help="promote a model's pinned origin and runtime from one environment to another")
    p.add_argument("model", help="the Model's name")
    p.add_argument("--from", dest="source", required=True, metavar="ENV", help="the environment to promote from")
    p.add_argument("--to", dest="target", required=True, metavar="ENV", help="the environment to promote to")
    p.add_argument("--repo", default=".", help="a clone of the manifest repository (default: .)")
    p.add_argument("--branch", help="commit on this new branch (default with --push: release/<model>-<env>-<id>)")
    p.add_argument("--push", action="store_true", help="push the branch to --remote")
    p.add_argument("--remote", default="origin", help="the remote to push to (default: origin)")
    p.add_argument("--config", help="daemon config: read the HuggingFace commit it deployed from its API; with "
                                    "--push and a forge status.provider, also open a pull request")
    p.add_argument("--api", help="daemon API base URL (instead of --config)")

    p = sub.add_parser("confirm", help="confirm the deletions a commit's pass holds (deletion safety)")
    p.add_argument("sha", help="the commit (7 to 40 hex digits) the held status names")
    p.add_argument("--config", help="daemon config, to find the API address and token")
    p.add_argument("--api", help="API base URL (default: from --config, else http://127.0.0.1:8081)")
