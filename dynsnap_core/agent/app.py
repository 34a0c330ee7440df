"""The agent's HTTP API (FastAPI): snapshots, restores, checks, jobs with progress, health, metrics and OpenAPI."""
from __future__ import annotations

import asyncio
import hmac
import json
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .._version import __version__
from ..errors import (DynsnapError, IncompatibleSnapshot, InvalidTarget, PermissionDenied, ProcessNotFound,
                      SnapshotCorrupt, SnapshotExists, SnapshotNotFound, StorageError)
from ..storage import check_name
from .jobs import TooManyJobs
from .service import Agent, Busy

__all__ = ["create_app"]

STATUS = [(TooManyJobs, 429), (SnapshotNotFound, 404), (ProcessNotFound, 404), (SnapshotExists, 409), (Busy, 409),
          (IncompatibleSnapshot, 409), (PermissionDenied, 403), (SnapshotCorrupt, 422), (InvalidTarget, 400),
          (StorageError, 502)]


def _status(e: DynsnapError) -> int:
    for cls, code in STATUS:
        if isinstance(e, cls):
            return code
    return 400


def _err(code: int, error: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": error, "message": message, **extra}, status_code=code)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SnapshotRequest(_Strict):
    """Snapshot one process tree: give exactly one of pid, container (id) or cgroup (path)."""

    pid: Optional[int] = Field(None, gt=0, description="root of the process tree")
    container: Optional[str] = Field(None, max_length=80, description="container id (containerd, CRI-O, Docker)")
    cgroup: Optional[str] = Field(None, max_length=4096, description="cgroup path of the container")
    name: Optional[str] = Field(None, max_length=128, description="snapshot name (default: command-pid-time)")
    leave_running: bool = Field(False, description="keep the tree running after the snapshot")
    upload: Optional[bool] = Field(None, description="upload to object storage (default: when configured)")


class RestoreRequest(_Strict):
    """Restore a snapshot (downloading it from object storage first when it is not on this node)."""

    verify: bool = Field(True, description="check every checksum before the tree runs")
    device_map: Optional[dict[str, str]] = Field(None, description="GPU UUID remap OLD=NEW")


class _BodyLimit:
    """Pure ASGI middleware: reads the request body up to ``limit`` bytes, answers 413 past it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        try:
            declared = int(headers.get(b"content-length", b"0") or 0)
        except ValueError:
            declared = 0
        if declared > self.limit:
            return await self._too_large(scope, receive, send)
        body = b""
        more = True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > self.limit:
                return await self._too_large(scope, receive, send)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()
        return await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        resp = _err(413, "RequestTooLarge", f"the request body is larger than {self.limit} bytes")
        await resp(scope, receive, send)


class _BearerAuth:
    """Pure ASGI middleware for TCP: every request but /healthz needs ``Authorization: Bearer <token>``."""

    OPEN = ("/healthz",)

    def __init__(self, app, token: str):
        self.app, self.token = app, token.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") in self.OPEN:
            return await self.app(scope, receive, send)
        got = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, value = got.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(value.strip(), self.token):
            msg = ("this agent needs a bearer token (Authorization: Bearer <token>)" if not got
                   else "the bearer token is wrong")
            resp = _err(401, "Unauthorized", msg)
            resp.headers["WWW-Authenticate"] = 'Bearer realm="dynsnap"'
            return await resp(scope, receive, send)
        return await self.app(scope, receive, send)


def create_app(agent: Agent, *, token: Optional[str] = None, max_body: int = 64 << 10) -> Any:
    """The ASGI application for ``agent``; with ``token`` every request but /healthz must carry it."""
    app = FastAPI(title="dynsnap agent", version=__version__, docs_url=None, redoc_url=None,
                  description="Node agent of dynsnap: snapshot and restore process trees and containers on this "
                              "node; long work runs as jobs with progress.")

    @app.exception_handler(DynsnapError)
    async def _dynsnap_error(request: Request, e: DynsnapError):
        return JSONResponse(e.to_dict(), status_code=_status(e))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        kind = first.get("type", "")
        if kind == "json_invalid":
            return _err(400, "MalformedJSON", f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})")
        if kind == "extra_forbidden":
            msg = f"unknown field {where!r}"
        elif kind == "model_attributes_type" or kind == "dict_type":
            msg = "the request body must be a JSON object"
        else:
            msg = f"field {where!r}: {first.get('msg', 'invalid')}" if where else first.get("msg", "invalid request")
        return _err(422, "InvalidRequest", msg, details=json.loads(json.dumps(errs, default=str)))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        if e.status_code == 404:
            return _err(404, "NotFound", f"no such endpoint: {request.method} {request.url.path}")
        if e.status_code == 405:
            return _err(405, "MethodNotAllowed", f"{request.method} is not allowed on {request.url.path}")
        return _err(e.status_code, "HTTPError", str(e.detail))

    def job_response(job, code: int = 202) -> JSONResponse:
        return JSONResponse(job.to_dict(), status_code=code, headers={"Location": f"/v1/jobs/{job.id}"})

    # /healthz and job waits are async: they never take a thread from the pool that blocking requests share,
    # so a busy agent still answers its liveness probe
    @app.get("/healthz", summary="liveness: the agent answers")
    async def healthz() -> dict:
        return {"status": "ok", "version": __version__, "jobs": agent.jobs.counts(), "root": str(agent.root),
                "storage": agent.remote.url if agent.remote is not None else None}

    @app.get("/metrics", summary="Prometheus metrics")
    def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return Response(generate_latest(agent.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/snapshots", status_code=202, summary="snapshot a process tree or container (a job)")
    def create_snapshot(req: SnapshotRequest) -> JSONResponse:
        if req.name is not None:
            check_name(req.name)
        job = agent.create(name=req.name, pid=req.pid, container=req.container, cgroup=req.cgroup,
                           leave_running=req.leave_running, upload=req.upload)
        return job_response(job)

    @app.get("/v1/snapshots", summary="snapshots on this node and, when configured, in object storage "
                                      "(?location=local|remote|all)")
    def list_snapshots(location: str = "all") -> list:
        return agent.list(location)

    @app.get("/v1/snapshots/{name}", summary="one snapshot and its manifest")
    def get_snapshot(name: str) -> dict:
        check_name(name)
        return agent.describe(name)

    @app.delete("/v1/snapshots/{name}", summary="delete a snapshot (node, cache and object storage)")
    def delete_snapshot(name: str, remote: bool = True) -> dict:
        check_name(name)
        return agent.delete(name, remote=remote)

    @app.post("/v1/snapshots/{name}/restore", status_code=202, summary="restore a snapshot (a job)")
    def restore_snapshot(name: str, req: Optional[RestoreRequest] = None) -> JSONResponse:
        check_name(name)
        req = req or RestoreRequest()
        return job_response(agent.restore(name, verify=req.verify, device_map=req.device_map))

    @app.post("/v1/snapshots/{name}/upload", status_code=202,
              summary="upload a snapshot of this node to object storage (a job; e.g. after a failed upload)")
    def upload_snapshot(name: str) -> JSONResponse:
        check_name(name)
        return job_response(agent.upload(name))

    @app.post("/v1/snapshots/{name}/check", summary="can this node restore the snapshot? each fact ok or refused")
    def check_snapshot(name: str) -> dict:
        check_name(name)
        return agent.check(name)

    @app.get("/v1/jobs", summary="all jobs of this agent")
    def list_jobs() -> list:
        return [j.to_dict() for j in agent.jobs.all()]

    def _job(job_id: str):
        job = agent.jobs.get(job_id)
        if job is None:
            raise SnapshotNotFound(f"no job {job_id}", stage="lookup")
        return job

    @app.get("/v1/jobs/{job_id}", summary="a job's state and progress; ?wait=SECONDS waits for it to finish")
    async def get_job(job_id: str, wait: float = 0, events: bool = False) -> dict:
        job = _job(job_id)
        wait = max(0.0, min(wait, 600.0))
        if wait:
            loop = asyncio.get_running_loop()
            end = loop.time() + wait
            while job.state not in ("succeeded", "failed") and loop.time() < end:
                await asyncio.sleep(0.05)
        return job.to_dict(events=events)

    @app.get("/v1/jobs/{job_id}/events", summary="live progress: one JSON object per line until the job ends")
    async def job_events(job_id: str) -> StreamingResponse:
        job = _job(job_id)

        async def stream():
            sent = 0
            last = None
            while True:
                snap = job.to_dict(events=True)
                evs = snap.pop("events")
                for ev in evs[sent:]:
                    yield json.dumps({"event": ev}) + "\n"
                sent = len(evs)
                cur = (snap["state"], snap["phase"], snap["done"], snap["total"])
                if cur != last:
                    yield json.dumps({"job": snap}) + "\n"
                    last = cur
                if snap["state"] in ("succeeded", "failed"):
                    return
                await asyncio.sleep(0.1)
        return StreamingResponse(stream(), media_type="application/x-ndjson")

    asgi: Any = _BodyLimit(app, max_body)
    if token is not None:
        asgi = _BearerAuth(asgi, token)
    asgi.fastapi = app            # for tests and the OpenAPI dump
    return asgi
