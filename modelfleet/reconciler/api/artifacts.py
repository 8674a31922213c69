"""Artifact upload API: resumable, token-authenticated, streamed to disk (never whole in memory).

Mounted into the daemon API (``Starlette(routes=[..., *artifact_routes(store, token)])``)::

    POST   /api/v1/uploads                 {"name": "m.mar", "size"?: N, "sha256"?: "sha256:..."}
                                           → 201 {"id", "offset": 0, "url", ...}
    HEAD   /api/v1/uploads/{id}            → 200, headers Upload-Offset (and Upload-Length)
    GET    /api/v1/uploads/{id}            → 200 {"id", "name", "offset", "size", ...}
    PATCH  /api/v1/uploads/{id}            header Upload-Offset: N, body = the next bytes
                                           → 200 {"offset"} (+ Upload-Offset header);
                                             409 {"error", "offset"} when N is not the current offset
    POST   /api/v1/uploads/{id}/complete   {"sha256"?: "sha256:..."} → 201 artifact (below);
                                           422 with the validation message (bad .mar, digest
                                           mismatch: nothing stored, the session is gone)
    DELETE /api/v1/uploads/{id}            → 204 (abandon)
    PUT    /api/v1/artifacts?name=m.mar[&sha256=...]   one-shot streamed upload → 201 artifact
    GET    /api/v1/artifacts               → {"artifacts": [artifact, ...]}
    GET    /api/v1/artifacts/{sha256}      → artifact | 404

    artifact = {"sha256": "sha256:<hex>", "size", "created", "name", "model_name", "handler",
                "version", "origin": {"file": {"sha256": "sha256:<hex>"}}}

Every route needs ``Authorization: Bearer <api token>`` when a token is configured (401 otherwise).
Bytes reach the disk as they arrive (batched writes in a worker thread); a dropped connection
keeps what arrived, and HEAD tells where to resume. A full disk under stateDir is answered
``507 {"error": "cannot write ...: disk full (N bytes free); free space under stateDir ..."}``
(another write failure: 500 with the same shape); the temporary file or the session is removed,
so nothing half written is kept or ever visible in the store. Abandoned sessions are removed after
``abandon_after`` seconds (checked when sessions are created).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from modelfleet.reconciler.artifacts.errors import InvalidArtifact
from modelfleet.reconciler.artifacts.mar import DEFAULT_LIMITS, MarLimits, validate_mar
from modelfleet.reconciler.artifacts.store import ArtifactStore, normalize_digest
from modelfleet.reconciler.artifacts.uploads import (
    NOTHING_STORED,
    UploadError,
    UploadManager,
    artifact_json,
    mar_meta,
    storage_error,
)
from modelfleet.reconciler.secrets import bearer_token_matches
from modelfleet.reconciler.statedir import StoreError

log = logging.getLogger("modelfleet.api.artifacts")
WRITE_BATCH = 4 << 20  # bytes gathered before one write (in a worker thread)
MAX_JSON = 64 << 10


def artifact_routes(
    store: ArtifactStore,
    api_token: str | None,
    *,
    uploads: UploadManager | None = None,
    abandon_after: float = 24 * 3600.0,
    max_size: int | None = None,
    limits: MarLimits = DEFAULT_LIMITS,
) -> list[Route]:
    manager = uploads or UploadManager(store, abandon_after=abandon_after, max_size=max_size, limits=limits)
    locks: dict[str, asyncio.Lock] = {}

    def lock_for(upload_id: str) -> asyncio.Lock:
        return locks.setdefault(upload_id, asyncio.Lock())

    def authorized(request: Request) -> bool:
        if api_token is None:
            return True
        return bearer_token_matches(request.headers.get("authorization"), api_token)

    def error(status: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
        return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)

    def denied() -> JSONResponse:
        return error(401, "unauthorized: send Authorization: Bearer <api token>",
                     {"WWW-Authenticate": 'Bearer realm="modelfleet"'})

    async def small_json(request: Request) -> dict[str, Any]:
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_JSON:
                raise UploadError(413, "JSON body too large")
        if not body.strip():
            return {}
        try:
            data = json.loads(body)
        except ValueError:
            raise UploadError(400, "body is not JSON") from None
        if not isinstance(data, dict):
            raise UploadError(400, "body must be a JSON object")
        return data

    async def create(request: Request) -> Response:
        if not authorized(request):
            return denied()
        try:
            data = await small_json(request)
            state = await run_in_threadpool(manager.create, data.get("name") or "upload.mar",
                                            data.get("size"), data.get("sha256"))
        except UploadError as exc:
            return error(exc.status, exc.message, **exc.extra)
        url = f"/api/v1/uploads/{state.id}"
        return JSONResponse({**state.to_json(), "url": url}, status_code=201,
                            headers={"Location": url, "Upload-Offset": "0"})

    async def session(request: Request) -> Response:
        if not authorized(request):
            return denied()
        upload_id = request.path_params["upload_id"]
        state = manager.get(upload_id)
        if state is None:
            return error(404, f"no upload {upload_id} (finished, abandoned or never created)")
        if request.method in ("GET", "HEAD"):
            headers = {"Upload-Offset": str(state.offset), "Cache-Control": "no-store"}
            if state.size is not None:
                headers["Upload-Length"] = str(state.size)
            if request.method == "HEAD":
                return Response(status_code=200, headers=headers)
            return JSONResponse(state.to_json(), headers=headers)
        if request.method == "DELETE":
            async with lock_for(upload_id):
                await run_in_threadpool(manager.abort, upload_id)
            locks.pop(upload_id, None)
            return Response(status_code=204)
        return await append(request, upload_id)

    async def append(request: Request, upload_id: str) -> Response:
        raw_offset = request.headers.get("upload-offset")
        if raw_offset is None or not raw_offset.isdigit():
            return error(400, "PATCH needs an Upload-Offset header with the byte offset of the body")
        offset = int(raw_offset)
        lock = lock_for(upload_id)
        if lock.locked():
            return error(409, "another request is writing this upload; ask HEAD for the offset and retry")
        async with lock:
            state = manager.get(upload_id)
            if state is None:
                return error(404, f"no upload {upload_id}")
            if offset != state.offset:
                return error(409, f"offset mismatch: the upload has {state.offset} bytes, got Upload-Offset {offset}",
                             {"Upload-Offset": str(state.offset)}, offset=state.offset)
            limit = state.size if state.size is not None else manager.max_size
            try:
                appender = await run_in_threadpool(manager.appender, upload_id, offset)
            except StoreError as exc:
                return error(507 if exc.disk_full else 500, exc.message)
            received = offset
            batch = bytearray()
            disconnected = False
            too_big = False
            failed: StoreError | None = None
            try:
                async for chunk in request.stream():
                    received += len(chunk)
                    if limit is not None and received > limit:
                        too_big = True
                        break
                    batch += chunk
                    if len(batch) >= WRITE_BATCH:
                        await run_in_threadpool(appender.write, bytes(batch))
                        batch.clear()
            except ClientDisconnect:
                disconnected = True
            except StoreError as exc:
                failed = exc
            finally:
                try:
                    if batch and not too_big and failed is None:
                        await run_in_threadpool(appender.write, bytes(batch))
                except StoreError as exc:
                    failed = exc
                new_offset = await run_in_threadpool(appender.close)
            if failed is not None:
                # The rest cannot fit: drop the session now (its bytes would keep the disk full).
                await run_in_threadpool(manager.abort, upload_id)
                locks.pop(upload_id, None)
                log.warning("upload %s: %s", upload_id[:8], failed.message)
                answer = storage_error(failed, "the upload was removed: " + NOTHING_STORED)
                return error(answer.status, answer.message)
            if disconnected:
                log.info("upload %s: client went away at offset %d; it can resume", upload_id[:8], new_offset)
                return Response(status_code=400)
            if too_big:
                return error(413, f"upload exceeds its declared size or the limit ({limit} bytes)",
                             {"Upload-Offset": str(new_offset)}, offset=new_offset)
            return JSONResponse({"id": upload_id, "offset": new_offset}, headers={"Upload-Offset": str(new_offset)})

    async def complete(request: Request) -> Response:
        if not authorized(request):
            return denied()
        upload_id = request.path_params["upload_id"]
        try:
            data = await small_json(request)
            lock = lock_for(upload_id)
            if lock.locked():
                return error(409, "the upload is still being written")
            async with lock:
                done = await run_in_threadpool(manager.complete, upload_id, data.get("sha256"))
        except UploadError as exc:
            return error(exc.status, exc.message, **exc.extra)
        locks.pop(upload_id, None)
        log.info("artifact %s stored (%s, %d bytes)", done.artifact.ref, done.name, done.artifact.size)
        return JSONResponse(done.to_json(), status_code=201)

    async def put_artifact(request: Request) -> Response:
        if not authorized(request):
            return denied()
        name = request.query_params.get("name") or request.headers.get("x-artifact-name") or "upload.mar"
        expected = request.query_params.get("sha256") or request.headers.get("x-artifact-sha256")
        if "/" in name or "\\" in name or len(name) > 255:
            return error(400, "name must be a file name")
        if expected is not None:
            try:
                normalize_digest(expected)
            except ValueError as exc:
                return error(400, str(exc))
        try:
            writer = await run_in_threadpool(store.writer)
        except StoreError as exc:
            answer = storage_error(exc, NOTHING_STORED)
            return error(answer.status, answer.message)
        batch = bytearray()
        size = 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if manager.max_size is not None and size > manager.max_size:
                    return error(413, f"artifact exceeds the limit of {manager.max_size} bytes")
                batch += chunk
                if len(batch) >= WRITE_BATCH:
                    await run_in_threadpool(writer.write, bytes(batch))
                    batch.clear()
            if batch:
                await run_in_threadpool(writer.write, bytes(batch))
            await run_in_threadpool(writer.flush)
            mar = None
            if name.lower().endswith(".mar"):
                mar = await run_in_threadpool(validate_mar, writer.temp_path, manager.limits, name)
            try:
                artifact = await run_in_threadpool(writer.commit, expected)
            except ValueError as exc:
                return error(422, f"{name}: {exc}")
        except ClientDisconnect:
            return Response(status_code=400)
        except InvalidArtifact as exc:
            return error(422, exc.message)
        except StoreError as exc:
            log.warning("upload of %s failed: %s", name, exc.message)
            answer = storage_error(exc, NOTHING_STORED)
            return error(answer.status, answer.message)
        finally:
            await run_in_threadpool(writer.abort)  # no-op after a commit; removes the temporary file
        meta = {"name": name, **mar_meta(mar)}
        try:
            await run_in_threadpool(store.put_meta, artifact.digest, {**meta})
        except StoreError as exc:  # informative only: the artifact is stored and complete
            log.warning("artifact %s stored without its metadata: %s", artifact.ref, exc.message)
        return JSONResponse(artifact_json(artifact, meta), status_code=201)

    async def list_artifacts(request: Request) -> Response:
        if not authorized(request):
            return denied()
        items = [artifact_json(a, store.meta(a.digest)) for a in await run_in_threadpool(store.list)]
        return JSONResponse({"artifacts": items})

    async def get_artifact(request: Request) -> Response:
        if not authorized(request):
            return denied()
        digest = request.path_params["digest"]
        if not store.has(digest):
            return error(404, f"no artifact {digest}")
        artifact = store.get(digest)
        return JSONResponse(artifact_json(artifact, store.meta(artifact.digest)))

    return [
        Route("/api/v1/uploads", create, methods=["POST"]),
        Route("/api/v1/uploads/{upload_id}", session, methods=["GET", "HEAD", "PATCH", "DELETE"]),
        Route("/api/v1/uploads/{upload_id}/complete", complete, methods=["POST"]),
        Route("/api/v1/artifacts", put_artifact, methods=["PUT"]),
        Route("/api/v1/artifacts", list_artifacts, methods=["GET"]),
        Route("/api/v1/artifacts/{digest}", get_artifact, methods=["GET"]),
    ]
