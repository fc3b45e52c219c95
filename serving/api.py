"""The HTTP side: a LitSpec that registers every gallery endpoint and feeds ONE LitAPI worker.

Why one worker behind a spec
----------------------------
LitServe runs each LitAPI in its own worker process, and an embedded Chroma store must be
owned by exactly one process: a process that has loaded a collection's index does not see
vectors another process adds later (DESIGN.md), so "search right after add" would break as
soon as two processes held the store. Separate LitAPIs per endpoint (each with its own worker
and its own Chroma client) would have exactly that problem.

So `GallerySpec` (the mechanism behind LitServe's OpenAI spec) registers all the routes with
typed pydantic bodies; each route puts `{"op", "args"}` on the single request queue and awaits
the answer. `GalleryAPI` runs in the one inference worker (`workers_per_device=1`, one device):
`setup` opens the store and loads the checkpoint, `decode_request` checks the envelope,
`predict` runs the operation, `encode_response` returns the dict the route turns into its
response model. With `enable_async=True` the worker runs each request as a task whose blocking
work goes to a thread pool, so searches are answered while a long add-folder is running, and
all of them see the same Chroma client: consistent by construction. Writes to one user's
collection are serialised by a lock in the store; reads take none.

The HTTP processes (`num_api_servers`, 1 by default on a small machine) only parse, check the
body size and the admin key, and forward; they never open the store. The short reads a person
waits for (`LINK_OPS`: searches, listings, thumbnails) are forwarded over a Unix socket straight
to the worker instead of LitServe's queues (serving/worker_link.py: -1.2 to -1.7 ms per search,
+12-22% searches/s under load); they end in the same thread pool and the same `_dispatch`. Gallery keys are checked
in the worker, which holds their hashes (serving/keys.py): the envelope carries only the hash of
the key a request sent. The OpenAPI document is the contract: every route declares each status
it can answer with `ErrorResponse` (`ROUTE_ERRORS`), and security only when keys are required. Scaling past one machine would
mean Chroma's client/server mode instead of the embedded store.
"""

import asyncio
import faulthandler
import logging
import os
import secrets
import shutil
import signal
import tempfile
import threading
import time
import uuid
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import litserve as ls
from fastapi import File, HTTPException, Path, Query, Request, Security, UploadFile
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.background import BackgroundTask
from starlette.datastructures import UploadFile as StarletteUploadFile
from litserve.callbacks.base import EventTypes
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, ResponseBufferItem

from serving.config import ServeSettings, configure_logging
from serving.keys import Caller, KeyRing, key_hash, unauthorized
from serving.schemas import (
    MAX_LIST_LIMIT,
    MAX_LIST_OFFSET,
    AddFolderRequest,
    AddFolderResponse,
    AddImageRequest,
    AddImageResponse,
    DeleteImageResponse,
    ErrorResponse,
    GalleryInfoResponse,
    ImageDetailResponse,
    InitializeRequest,
    InitializeResponse,
    JobResponse,
    ImportResponse,
    JobStartedResponse,
    KeyResponse,
    PruneResponse,
    RevokeKeyResponse,
    ListImagesResponse,
    ReindexResponse,
    SearchByImageRequest,
    SearchByImageUploadOptions,
    SearchRequest,
    SearchResponse,
)
from serving.worker_link import LinkClient, LinkDown, LinkServer, socket_path

logger = logging.getLogger(__name__)

CREATE_PATHS = ("/db/initialize", "/db/import")  # on loopback anyone may create a gallery (and get its key)
ADMIN_ONLY_PATHS = ("/info",)  # LitServe's server info names the checkpoint: admin key only
ADMIN_ONLY_OPS = ("keys_revoke",)
QUEUE_KEY = "/_gallery"  # the spec's request-queue key; no route is registered at this path
# Operations sent over the direct link when it is on: short reads a person waits for.
LINK_OPS = frozenset({"search", "search_by_image", "list_images", "image_info", "thumbnail", "image_file",
                      "info", "job"})
USER_ID = Query(min_length=1, max_length=128, description="The id /db/initialize returned.")
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False,
                               description="The gallery's API key (from /db/initialize), or the admin key.")
_bearer = HTTPBearer(auto_error=False, description="The gallery's API key or the admin key, as a bearer token.")
IMAGE_ID = Path(min_length=1, max_length=64, description="An image id of this gallery (another gallery's id is a 404).")
JOB_ID = Path(min_length=1, max_length=64)
WEB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web")
UPLOAD_PATHS = ("/images/upload", "/images/search-by-image", "/db/import")  # bodies up to max_upload_bytes
THUMBNAIL_CACHE_CONTROL = "private, max-age=3600"
FILE_CACHE_CONTROL = "private, no-cache"  # revalidate with the ETag: the file may change in place
_IMAGE_CONTENT = {"content": {"image/*": {"schema": {"type": "string", "format": "binary"}}},
                  "description": "The image bytes (ETag and Cache-Control headers; 304 on a matching If-None-Match)."}


ERROR_TEXT = {
    400: "Malformed request: a relative path, a folder where a file is expected (or the reverse), or a "
         "malformed multipart body.",
    401: "Missing or unknown API key (the server requires keys).",
    403: "Outside the folders this server may read, or the admin key is needed.",
    404: "Unknown user_id, image id or job id (another gallery's ids answer the same), or a missing file.",
    409: "The gallery was embedded by another model (re-index it), or it exists and needs its key.",
    413: "Request body, upload or image too large.",
    415: "Not a supported image format.",
    422: "Invalid parameters (out of range, wrong type), or a corrupt/truncated image.",
    503: "The server is shutting down; retry later.",
    504: "The request waited longer than the server's timeout for the gallery worker.",
}
_ALWAYS = (422, 503, 504)  # validation, and a worker that is stopping or saturated
_BODY = (413,)  # the body-size limit applies to every request with a body
# The statuses each route can answer besides 200 (401 is added when the server requires keys).
ROUTE_ERRORS = {
    ("/db/initialize", "POST"): (400, 403, 409, *_BODY),
    ("/db/info", "GET"): (404,),
    ("/db/reindex", "POST"): (404,),
    ("/db/prune", "POST"): (404,),
    ("/db/keys/rotate", "POST"): (404,),
    ("/db/keys/revoke", "POST"): (403, 404),
    ("/db/export", "GET"): (404,),
    ("/db/import", "POST"): (400, 403, 409, *_BODY),
    ("/images/add", "POST"): (400, 403, 404, 409, 415, *_BODY),
    ("/images/add-folder", "POST"): (400, 403, 404, 409, *_BODY),
    ("/images/search", "POST"): (400, 403, 404, 409, *_BODY),
    ("/images/search-by-image", "POST"): (400, 403, 404, 409, 415, *_BODY),
    ("/images/upload", "POST"): (400, 403, 404, 409, 415, *_BODY),  # 400: malformed multipart
    ("/images", "GET"): (404,),
    ("/images/{image_id}", "GET"): (404,),
    ("/images/{image_id}", "DELETE"): (404,),
    ("/images/{image_id}/thumbnail", "GET"): (403, 404, 413, 415),
    ("/images/{image_id}/file", "GET"): (403, 404),
    ("/jobs/{job_id}", "GET"): (404,),
    ("/jobs/{job_id}", "DELETE"): (404,),
}
_NOT_MODIFIED = {304: {"description": "Not modified (the If-None-Match ETag matches)."}}


def error_responses(codes, auth: bool) -> dict:
    codes = sorted(set(codes) | set(_ALWAYS) | ({401} if auth else set()))
    return {code: {"model": ErrorResponse, "description": ERROR_TEXT[code]} for code in codes}


def route_options(auth: bool) -> dict:
    """Per-route OpenAPI options: every status a route can answer, with the error model."""
    options = {}
    for key, codes in ROUTE_ERRORS.items():
        extra = GallerySpec.ROUTE_OPTIONS.get(key, {})
        responses = {**error_responses(codes, auth), **extra.get("responses", {})}
        if key[0].endswith(("/thumbnail", "/file")):
            responses.update(_NOT_MODIFIED)
        options[key] = {**extra, "responses": responses}
    if auth:  # LitServe's server info (names the checkpoint): the admin key only
        options[("/info", "GET")] = {"responses": {401: {"model": ErrorResponse, "description": ERROR_TEXT[401]}}}
    return options


def _multipart_schema(model) -> dict:
    schema = model.model_json_schema()
    schema["properties"] = {"file": {"type": "string", "format": "binary", "description": "The query image."},
                            **schema.get("properties", {})}
    schema["required"] = ["file"]
    return schema


class GallerySpec(LitSpec):
    """Registers the gallery routes; every route feeds the one `GalleryAPI` worker."""

    # Route options LitSpec.add_endpoint cannot pass (applied by `apply_route_options`).
    ROUTE_OPTIONS = {
        ("/images/add-folder", "POST"): {"responses": {202: {"model": JobStartedResponse,
                                                             "description": "background=true: the job was started"}}},
        ("/images/{image_id}/thumbnail", "GET"): {"response_class": FileResponse, "responses": {200: _IMAGE_CONTENT}},
        ("/images/{image_id}/file", "GET"): {"response_class": FileResponse, "responses": {200: _IMAGE_CONTENT}},
        ("/db/export", "GET"): {"response_class": FileResponse, "responses": {200: {
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            "description": "The backup file (.npz: header, ids, vectors, records)."}}},
        ("/images/search-by-image", "POST"): {"openapi_extra": {"requestBody": {"required": True, "content": {
            "application/json": {"schema": SearchByImageRequest.model_json_schema()},
            "multipart/form-data": {"schema": _multipart_schema(SearchByImageUploadOptions)},
        }}}},
    }

    def __init__(self, link: LinkClient | None = None):
        super().__init__()
        self.api_path = QUEUE_KEY
        self.link = link

    def pre_setup(self, lit_api: "ls.LitAPI"):
        for path, endpoint, methods in (
            ("/db/initialize", self.initialize, ["POST"]),
            ("/db/info", self.info, ["GET"]),
            ("/db/reindex", self.reindex, ["POST"]),
            ("/db/prune", self.prune, ["POST"]),
            ("/db/keys/rotate", self.rotate_key, ["POST"]),
            ("/db/keys/revoke", self.revoke_key, ["POST"]),
            ("/db/export", self.export_backup, ["GET"]),
            ("/db/import", self.import_backup, ["POST"]),
            ("/images/add", self.add_image, ["POST"]),
            ("/images/add-folder", self.add_folder, ["POST"]),
            ("/images/search", self.search, ["POST"]),
            ("/images/search-by-image", self.search_by_image, ["POST"]),
            ("/images/upload", self.upload, ["POST"]),
            ("/images", self.list_images, ["GET"]),
            ("/images/{image_id}", self.image_info, ["GET"]),
            ("/images/{image_id}", self.delete_image, ["DELETE"]),
            ("/images/{image_id}/thumbnail", self.thumbnail, ["GET"]),
            ("/images/{image_id}/file", self.image_file, ["GET"]),
            ("/jobs/{job_id}", self.job, ["GET"]),
            ("/jobs/{job_id}", self.cancel_job, ["DELETE"]),
        ):
            self.add_endpoint(path, endpoint, methods)

    def decode_request(self, request, context_kwargs=None):
        return request

    def encode_response(self, output, context_kwargs=None):
        return output

    async def _call(self, op: str, request: Request, **args) -> dict:
        """Send one operation to the worker and wait for its answer.

        The envelope carries who called (`Caller`: admin, or the hash of the key sent; never the
        key) so the worker, which owns the key hashes, decides what the caller may touch."""
        envelope = {"op": op, "args": args, "caller": getattr(request.state, "caller", None) or {}}
        ok, response = await self._over_link(envelope) if op in LINK_OPS and self.link else await self._queued(envelope)
        if not ok:
            if isinstance(response, HTTPException):
                raise response
            logger.error("gallery operation %s failed: %r", op, response)
            raise HTTPException(500, "internal error in the gallery worker; see the server log")
        return response

    async def _over_link(self, envelope: dict) -> tuple[bool, object]:
        try:
            return await self.link.call(envelope)
        except LinkDown:  # the worker is not listening yet (or any more): LitServe's queue waits for it
            return await self._queued(envelope)
        except ConnectionError:
            raise HTTPException(503, "the gallery worker stopped while answering; retry later") from None

    async def _queued(self, envelope: dict) -> tuple[bool, object]:
        """Through LitServe's request queue and its response buffer."""
        uid = uuid.uuid4().hex
        event = asyncio.Event()
        self.response_buffer[uid] = ResponseBufferItem(event=event)  # registered before it can be answered
        try:
            if self._server is not None:
                self._server._callback_runner.trigger_event(
                    EventTypes.ON_REQUEST.value, active_requests=self._server.active_requests, litserver=self._server
                )
            self.request_queue.put((self.response_queue_id, uid, time.monotonic(), envelope))
            await event.wait()
            response, status = self.response_buffer[uid].response
        finally:
            self.response_buffer.pop(uid, None)
        return status != LitAPIStatus.ERROR, response

    async def initialize(self, body: InitializeRequest, request: Request) -> InitializeResponse:
        """Create a gallery (or open the existing one with this name) and return its user_id.

        A new gallery's API key comes back once, as `api_key` (only its hash is stored). When
        the server requires keys, opening an existing gallery needs its key or the admin key
        (409 otherwise), and creating one off loopback needs the admin key."""
        return InitializeResponse(**await self._call("initialize", request, user_name=body.user_name))

    async def rotate_key(self, request: Request, user_id: str = USER_ID) -> KeyResponse:
        """A new API key for the gallery (shown once); the previous one stops working at once.
        Needs the gallery's current key or the admin key (when the server requires keys)."""
        return KeyResponse(**await self._call("keys_rotate", request, user_id=user_id))

    async def revoke_key(self, request: Request, user_id: str = USER_ID) -> RevokeKeyResponse:
        """Remove the gallery's key: only the admin key opens it until a rotate issues a new one.
        Admin key only (when the server requires keys)."""
        return RevokeKeyResponse(**await self._call("keys_revoke", request, user_id=user_id))

    async def prune(self, request: Request, user_id: str = USER_ID,
                    dry_run: bool = Query(False, description="Only report; remove nothing.")) -> PruneResponse:
        """Check every stored path: records of files gone from the disk are removed (reported
        with `dry_run=true`), files changed since they were indexed are reported (adding them
        again re-embeds them)."""
        return PruneResponse(**await self._call("prune", request, user_id=user_id, dry_run=dry_run))

    async def export_backup(self, request: Request, user_id: str = USER_ID):
        """The gallery as one backup file (vectors, records, model id; no key): restore it with
        POST /db/import here or on another server, or `python -m serving.cli import`."""
        info = await self._call("export_backup", request, user_id=user_id)
        return FileResponse(info["path"], media_type="application/octet-stream", filename=info["filename"],
                            background=BackgroundTask(_unlink, info["path"]))

    async def import_backup(self, request: Request,
                            file: UploadFile = File(description="A backup file from GET /db/export."),
                            user_name: Optional[str] = Query(None, min_length=1, max_length=128,
                                                             description="Gallery name (default: the backup's)."),
                            reindex: bool = Query(False, description="Embed the pictures again from their files "
                                                                     "(needed when the backup is of another model).")
                            ) -> ImportResponse:
        """Restore a backup into a gallery (created if new: its key is answered once). A backup of
        another model is refused (409) unless `reindex=true`. Up to `max_upload_bytes`; restore
        bigger ones with the CLI."""
        data = await file.read()
        return ImportResponse(**await self._call("import_backup", request, data=data, user_name=user_name,
                                                 reindex=reindex))

    async def info(self, request: Request, user_id: str = USER_ID) -> GalleryInfoResponse:
        """The gallery's name, size and model id (and whether it needs a re-index)."""
        return GalleryInfoResponse(**await self._call("info", request, user_id=user_id))

    async def reindex(self, request: Request, user_id: str = USER_ID, force: bool = Query(False, description="Re-embed even if the model matches.")) -> ReindexResponse:
        """Re-embed every stored image with the server's model (after a model change).

        Fills a new collection from the stored paths and switches to it at the end, so a failure
        leaves the old one intact. Files that can no longer be read are listed and dropped."""
        return ReindexResponse(**await self._call("reindex", request, user_id=user_id, force=force))

    async def add_image(self, body: AddImageRequest, request: Request, user_id: str = USER_ID) -> AddImageResponse:
        """Add one image file (a no-op if unchanged; not stored if identical to a stored image).

        Errors: 400 relative path or not a regular file, 403 outside the allowed roots,
        404 missing file or unknown user_id, 409 gallery embedded by another model,
        413 image too large (decompression-bomb guard), 415 not an image, 422 corrupt/truncated."""
        return AddImageResponse(**await self._call("add_image", request, user_id=user_id, image_path=body.image_path))

    async def add_folder(self, body: AddFolderRequest, request: Request, user_id: str = USER_ID,
                         background: bool = Query(False, description="Run as a job: 202 with its job_id at once.")
                         ) -> AddFolderResponse:
        """Add every image under a folder, sub-folders included (jpg, jpeg, png, webp, bmp, gif, tif, tiff).

        Files that fail are listed with their reason and status while the rest are added.
        With `background=true` the request is checked the same way, then answered 202 with a
        `job_id`: follow it with GET /jobs/{job_id}, cancel it with DELETE /jobs/{job_id}.
        Errors: 400 not a folder, 403 outside the allowed roots, 404 missing folder or unknown
        user_id, 409 gallery embedded by another model."""
        if background:
            started = await self._call("add_folder_job", request, user_id=user_id, folder_path=body.folder_path)
            return JSONResponse(JobStartedResponse(**started).model_dump(), status_code=202)
        return AddFolderResponse(**await self._call("add_folder", request, user_id=user_id, folder_path=body.folder_path))

    async def search(self, body: SearchRequest, request: Request, user_id: str = USER_ID) -> SearchResponse:
        """Images ranked by cosine similarity to a text query (top_k <= 100, offset paging,
        optional min_score and folder filter).

        Negative terms: `-word` tokens in `query` and the `negative` text push matching images
        down: the query vector becomes normalise(q - negative_weight * n), n the normalised mean
        embedding of the negative texts (as rclip does). Errors: 404 unknown user_id, 409 gallery
        embedded by another model (re-index it), 422 invalid parameters or only negative terms."""
        return SearchResponse(**await self._call("search", request, user_id=user_id, **body.model_dump()))

    async def search_by_image(self, request: Request, user_id: str = USER_ID) -> SearchResponse:
        """Images most similar to an image: a stored one (`{"image_id"}`, left out of its own
        results), a file on the server (`{"image_path"}`, allowed roots apply), or an uploaded
        file (multipart/form-data, field `file`, plus optional form fields top_k, offset,
        min_score, folder). Same response as /images/search. Errors: 404 unknown image id (also
        another gallery's), 413 file too large, 415 not an image, 422 corrupt or invalid."""
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            form = await request.form(max_files=1, max_fields=16)
            upload = form.get("file")
            if not isinstance(upload, StarletteUploadFile):
                raise HTTPException(422, "multipart body needs the image in the field 'file'")
            options = _validated(SearchByImageUploadOptions, {k: v for k, v in form.items() if k != "file"})
            data = await upload.read()
            args = {**options.model_dump(), "data": data, "filename": upload.filename}
        else:
            try:
                body = SearchByImageRequest.model_validate_json(await request.body() or b"{}")
            except ValidationError as error:  # the input may be bytes that are not UTF-8: leave it out
                raise RequestValidationError(error.errors(include_url=False, include_input=False)) from None
            args = body.model_dump()
        return SearchResponse(**await self._call("search_by_image", request, user_id=user_id, **args))

    async def upload(self, request: Request,
                     file: UploadFile = File(description="An image file (jpg, png, webp, bmp, gif, tiff)."),
                     user_id: str = USER_ID) -> AddImageResponse:
        """Upload an image: saved under the store folder (uploads/<user_id>/) and added.

        Errors: 413 over max_upload_bytes (32 MiB by default) or over 89 MP, 415 not an image,
        422 corrupt, truncated or empty."""
        data = await file.read()
        return AddImageResponse(**await self._call("upload", request, user_id=user_id, data=data, filename=file.filename))

    async def image_info(self, request: Request, image_id: str = IMAGE_ID, user_id: str = USER_ID) -> ImageDetailResponse:
        """One stored image: path, size, dates, pixel size."""
        return ImageDetailResponse(**await self._call("image_info", request, user_id=user_id, image_id=image_id))

    async def thumbnail(self, request: Request, image_id: str = IMAGE_ID, user_id: str = USER_ID):
        """A JPEG thumbnail (long side `thumbnail_size`, 256 px by default), cached on disk."""
        info = await self._call("thumbnail", request, user_id=user_id, image_id=image_id)
        return _file_response(request, info, THUMBNAIL_CACHE_CONTROL)

    async def image_file(self, request: Request, image_id: str = IMAGE_ID, user_id: str = USER_ID):
        """The original image file, with its content type."""
        info = await self._call("image_file", request, user_id=user_id, image_id=image_id)
        return _file_response(request, info, FILE_CACHE_CONTROL, filename=os.path.basename(info["path"]))

    async def job(self, request: Request, job_id: str = JOB_ID, user_id: str = USER_ID) -> JobResponse:
        """A background job's state (queued, running, done, failed, cancelled) and progress."""
        return JobResponse(**await self._call("job", request, user_id=user_id, job_id=job_id))

    async def cancel_job(self, request: Request, job_id: str = JOB_ID, user_id: str = USER_ID) -> JobResponse:
        """Cancel a job: it stops after the batch in hand (every stored batch stays whole and
        searchable; adding the folder again finishes the rest). A job that already ended is
        returned unchanged."""
        return JobResponse(**await self._call("cancel_job", request, user_id=user_id, job_id=job_id))

    async def list_images(self, request: Request, user_id: str = USER_ID,
                          offset: int = Query(0, ge=0, le=MAX_LIST_OFFSET),
                          limit: int = Query(100, ge=1, le=MAX_LIST_LIMIT)) -> ListImagesResponse:
        """The stored images, paged."""
        return ListImagesResponse(**await self._call("list_images", request, user_id=user_id, offset=offset, limit=limit))

    async def delete_image(self, request: Request, image_id: str = IMAGE_ID, user_id: str = USER_ID
                           ) -> DeleteImageResponse:
        """Remove one image from the gallery (the file is not touched)."""
        return DeleteImageResponse(**await self._call("delete_image", request, user_id=user_id, image_id=image_id))


def _validated(model, values: dict):
    try:
        return model.model_validate(values)
    except ValidationError as error:
        raise RequestValidationError(error.errors(include_url=False, include_input=False)) from None


def _file_response(request: Request, info: dict, cache_control: str, filename: str | None = None) -> Response:
    etag = f'"{info["etag"]}"'
    headers = {"ETag": etag, "Cache-Control": cache_control,
               "X-Content-Type-Options": "nosniff"}  # a polyglot file is never sniffed into HTML
    wanted = [tag.strip() for tag in request.headers.get("if-none-match", "").split(",")]
    if etag in wanted or f"W/{etag}" in wanted:
        return Response(status_code=304, headers=headers)
    return FileResponse(info["path"], media_type=info["media_type"], headers=headers, filename=filename,
                        content_disposition_type="inline")


def apply_route_options(app, options: dict) -> None:
    """Re-create the spec's routes that need options `LitSpec.add_endpoint` cannot pass."""
    for index, route in enumerate(app.router.routes):
        if not isinstance(route, APIRoute):
            continue
        for method in route.methods:
            extra = options.get((route.path, method))
            if extra:
                app.router.routes[index] = APIRoute(
                    route.path, route.endpoint, methods=list(route.methods), dependencies=route.dependencies,
                    name=route.name, **extra)


def install_web_page(app) -> None:
    """The web page at / (replacing LitServe's plain-text index) and its files under /web/.

    They are static files without data, so they need no API key; the page asks for the key
    when the server has one and sends it with every API call."""
    app.router.routes[:] = [r for r in app.router.routes
                            if not (isinstance(r, APIRoute) and r.path == "/" and "GET" in r.methods)]

    async def index() -> FileResponse:
        return FileResponse(os.path.join(WEB_DIR, "index.html"), media_type="text/html",
                            headers={"Cache-Control": "no-cache"})

    app.add_api_route("/", index, methods=["GET"], response_class=FileResponse, summary="The web page",
                      responses={200: {"content": {"text/html": {"schema": {"type": "string"}}},
                                       "description": "The web page (HTML); it needs no key, its API calls do."}})
    app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")


def install_health(app, path: str) -> None:
    """LitServe's health probe, answered as declared: text/plain "ok" (200) or "not ready" (503), no key."""
    for index, route in enumerate(app.router.routes):
        if isinstance(route, APIRoute) and route.path == path:
            probe = route.endpoint

            async def health(request: Request) -> PlainTextResponse:
                answer = await probe(request)
                return PlainTextResponse(bytes(answer.body).decode(), status_code=answer.status_code)

            app.router.routes[index] = APIRoute(
                path, health, methods=["GET"], response_class=PlainTextResponse, summary="Health",
                responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "ready"},
                           503: {"content": {"text/plain": {"schema": {"type": "string"}}},
                                 "description": "the gallery worker is still starting"}})


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _no_auth() -> None:
    """The authorize dependency of a server that checks no keys: it declares no security in the spec."""


class GalleryAPI(ls.LitAPI):
    """The one worker that owns the store and the model (see the module docstring)."""

    def __init__(self, settings: ServeSettings, link_path: str | None = None):
        super().__init__(spec=GallerySpec(LinkClient(link_path) if link_path else None), enable_async=True,
                         max_batch_size=1)
        self.settings = settings
        self.link_path = link_path
        self.api_key = settings.api_key  # the admin key
        self.auth = settings.auth_enabled
        if not self.auth:  # LitServe uses `authorize` as the routes' dependency: this one declares no security
            self.authorize = _no_auth
        self.healthcheck_path = "/health"
        self.gallery = None

    # ------------------------------------------------ HTTP process side (LitServe calls it per request)

    def authorize(self, request: Request, x_api_key: Optional[str] = Security(_api_key_header),
                  bearer: Optional[HTTPAuthorizationCredentials] = Security(_bearer)):
        """Who is calling, for a server that requires keys (see serving/keys.py).

        The admin key is recognised here; any other key is forwarded to the worker as its hash
        (`request.state.caller`), since only the worker holds the gallery keys' hashes. No key
        at all is a 401 at once, except creating a gallery on a loopback server."""
        path = request.url.path
        if path == self.healthcheck_path:
            return
        supplied = x_api_key or (bearer.credentials if bearer else None)
        if supplied and self.api_key and secrets.compare_digest(
                supplied.encode("utf-8", "surrogatepass"), str(self.api_key).encode()):
            request.state.caller = {"admin": True}
            return
        if supplied and path not in ADMIN_ONLY_PATHS:
            request.state.caller = {"key_hash": key_hash(supplied)}
            return
        if not supplied and path in CREATE_PATHS and self.settings.is_loopback:
            request.state.caller = {}
            return
        raise HTTPException(
            401, "missing or wrong API key: send the gallery's key (or the admin key) as 'X-API-Key: <key>' "
                 "or 'Authorization: Bearer <key>'", headers={"WWW-Authenticate": "Bearer"})

    # ------------------------------------------------ worker process side

    def setup(self, device):
        from serving.gallery import Gallery

        configure_logging(self.settings.log_level)
        _use_uvloop()
        self.stop = threading.Event()
        self._busy = _Busy()
        _install_worker_signals(self.stop, self._busy)
        settings = self.settings
        if settings.device == "auto":
            settings = ServeSettings.from_mapping({**settings.to_dict(), "device": str(device)})
        self._executor = ThreadPoolExecutor(settings.search.request_threads, thread_name_prefix="gallery")
        self.gallery = Gallery.open(settings, stop=self.stop)
        self.keys = KeyRing(settings.db_dir)
        if self.link_path:
            self._link_server = LinkServer(self.link_path, self._answer_link, self._executor)
            self._link_server.start()
        logger.info("gallery worker ready: model %s, store %s", self.gallery.model_id, settings.db_dir)

    async def decode_request(self, request, **kwargs):
        if not isinstance(request, dict) or "op" not in request:
            raise HTTPException(400, "malformed gallery request")
        return request

    async def predict(self, request, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._dispatch, request)

    async def encode_response(self, output, **kwargs):
        return output

    def _answer_link(self, request: dict, sent_at: float) -> dict:
        """A request from the direct link, with LitServe's rule for one that waited too long."""
        if self.settings.timeout not in (-1, False, None) and time.monotonic() - sent_at > self.settings.timeout:
            raise HTTPException(504, "Request timed out")
        try:
            return self._dispatch(request)
        except HTTPException:
            raise
        except Exception:
            logger.exception("gallery operation %s failed", request.get("op"))
            raise

    def _dispatch(self, request: dict) -> dict:
        from serving.errors import GalleryError
        from serving.ingest import IngestCancelled

        try:
            with self._busy:
                return self._guarded(request)
        except GalleryError as error:
            raise HTTPException(error.status_code, error.detail) from None
        except IngestCancelled as error:
            raise HTTPException(503, str(error)) from None

    def _guarded(self, request: dict) -> dict:
        """Run one operation for its caller: key checks first (when the server requires keys)."""
        caller = Caller.from_dict(request.get("caller"))
        op, args = request.get("op"), dict(request.get("args") or {})
        if op == "initialize":
            return self._initialize(caller, args.get("user_name"))
        if op == "import_backup":
            return self._import(caller, args)
        user_id = args.get("user_id")
        if self.auth:
            self.keys.authorize(caller, user_id, admin_only=op in ADMIN_ONLY_OPS)
        if op == "keys_rotate":
            self.gallery.info(user_id)  # 404 for an unknown gallery
            return {"user_id": user_id, "api_key": self.keys.issue(user_id)}
        if op == "keys_revoke":
            self.gallery.info(user_id)
            return {"user_id": user_id, "revoked": self.keys.revoke(user_id)}
        return self.gallery.dispatch({"op": op, "args": args})

    def _initialize(self, caller: Caller, user_name) -> dict:
        """Open or create a gallery; a new gallery's key is made here and answered once."""
        self._may_open_or_create(caller, user_name)
        info = self.gallery.initialize(user_name)
        info["api_key"] = self.keys.issue(info["user_id"]) if info.get("created") else None
        return info

    def _import(self, caller: Caller, args: dict) -> dict:
        """Restore an uploaded backup into the gallery it names (or `user_name`), with the same
        rules as initialize for who may open or create it."""
        from serving.backup import read_backup

        tmp = self.gallery._write_tmp(args.get("data"))
        try:
            header = read_backup(tmp, 4 * self.gallery.max_upload_bytes)[0]
        finally:
            tmp.unlink(missing_ok=True)
        name = args.get("user_name") or header.get("user_name")
        self._may_open_or_create(caller, name)
        summary = self.gallery.import_backup(args["data"], name, bool(args.get("reindex")))
        summary["api_key"] = self.keys.issue(summary["user_id"]) if summary["created"] else None
        return summary

    def _may_open_or_create(self, caller: Caller, user_name) -> None:
        from serving.errors import GalleryError

        existing = self.gallery.store.find_user(user_name) if isinstance(user_name, str) else None
        if self.auth and not caller.admin:
            owner = self.keys.owner(caller.key_hash)
            if caller.key_hash and owner is None:
                raise unauthorized()
            if existing is not None and owner != existing.user_id:
                raise GalleryError(409, f"a gallery named {user_name!r} exists; open it with its key (or the admin "
                                        "key), or choose another name")
            if existing is None and not self.settings.is_loopback:
                raise GalleryError(403, "on this server only the admin key creates galleries")


def _use_uvloop() -> None:
    """uvloop for the event loop LitServe makes in this worker after `setup` (uvicorn already
    uses it in the HTTP process). The worker's loop runs a task per request and every hand-off
    from the thread pool: uvloop saved 0.3-0.6 ms of CPU per search, +5% searches/s with 50
    clients at 100k images (docs/benchmarks.md). uvloop comes with chromadb's uvicorn[standard];
    without it the standard loop runs, nothing else changes."""
    try:
        import uvloop
    except ImportError:
        logger.info("uvloop is not installed: the gallery worker runs asyncio's own event loop")
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _install_worker_signals(stop: threading.Event, idle: "_Busy", grace_s: float = 4.0) -> None:
    """SIGTERM: stop ingest loops between batches, let running operations end (<= grace_s), exit.

    The exit is `os._exit`: LitServe's async loop leaves a thread blocked for ever on the
    request queue, which a normal interpreter exit would wait for. Nothing is lost by it: every
    store write is a committed transaction, and the store lock is released by the kernel.
    Also exits if the server process dies (so the worker is never orphaned), and dumps all
    thread stacks on SIGUSR1 for diagnosis.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    parent = os.getppid()

    def exit_when_idle():
        idle.wait_idle(grace_s)
        logging.shutdown()
        os._exit(0)

    def on_term(signum, frame):
        if not stop.is_set():
            stop.set()
            threading.Thread(target=exit_when_idle, name="worker-exit", daemon=True).start()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    faulthandler.register(signal.SIGUSR1, all_threads=True)

    def watch_parent():
        while not stop.wait(1.0):
            if os.getppid() != parent:
                logger.warning("the server process is gone; the gallery worker exits")
                on_term(signal.SIGTERM, None)
                return

    threading.Thread(target=watch_parent, name="parent-watchdog", daemon=True).start()


class _Busy:
    """Counts operations in flight, so shutdown can wait for them."""

    def __init__(self):
        self._count = 0
        self._cond = threading.Condition()

    def __enter__(self):
        with self._cond:
            self._count += 1

    def __exit__(self, *exc):
        with self._cond:
            self._count -= 1
            self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._count == 0, timeout)


class BodySizeLimit:
    """Answer 413 to request bodies over `max_bytes` (by Content-Length, or while streaming);
    the upload routes allow `upload_bytes` (the file limit plus room for the multipart framing)."""

    def __init__(self, app, max_bytes: int, upload_bytes: int | None = None, upload_paths=UPLOAD_PATHS):
        self.app = app
        self.max_bytes = max_bytes
        self.upload_bytes = upload_bytes or max_bytes
        self.upload_paths = tuple(upload_paths)

    def _too_large(self, limit: int) -> str:
        return f"request body too large (limit {limit} bytes)"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.upload_bytes if scope.get("path") in self.upload_paths else self.max_bytes
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await JSONResponse({"detail": self._too_large(limit)}, status_code=413)(scope, receive, send)
        total = 0

        async def limited_receive():
            nonlocal total
            message = await receive()
            if message["type"] == "http.request":
                total += len(message.get("body", b""))
                if total > limit:
                    raise HTTPException(413, self._too_large(limit))  # FastAPI turns it into the 413 response
            return message

        await self.app(scope, limited_receive, send)


def build_server(settings: ServeSettings) -> ls.LitServer:
    """A LitServer with exactly one gallery worker (the store owner)."""
    link_dir = tempfile.mkdtemp(prefix="smart-gallery-") if settings.search.direct_link else None  # mode 0700
    api = GalleryAPI(settings, socket_path(link_dir) if link_dir else None)
    accelerator = "cuda" if _cuda_wanted(settings) else "cpu"
    server = ls.LitServer(
        api,
        accelerator=accelerator,
        devices=1,
        workers_per_device=1,  # one store owner; never more
        timeout=settings.timeout,
        fast_queue=settings.fast_queue,
        middlewares=[(BodySizeLimit, {"max_bytes": settings.max_body_bytes,
                                      "upload_bytes": settings.max_upload_bytes + 65_536})],
        model_metadata={"app": "smart-gallery", "checkpoint": str(settings.checkpoint)},
    )
    apply_route_options(server.app, route_options(settings.auth_enabled))
    install_web_page(server.app)
    install_health(server.app, api.healthcheck_path)
    server.app.add_exception_handler(RequestValidationError, _validation_error)
    server.uvicorn_graceful_timeout = settings.graceful_shutdown_s
    if link_dir:
        weakref.finalize(server, shutil.rmtree, link_dir, ignore_errors=True)
    return server


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 answer, safe for inputs that are not UTF-8 (its own handler raised on them: a 500)."""
    detail = jsonable_encoder(error.errors(), custom_encoder={bytes: lambda raw: raw.decode("utf-8", "replace")})
    return JSONResponse({"detail": detail}, status_code=422)


def _cuda_wanted(settings: ServeSettings) -> bool:
    if settings.device.startswith("cuda"):
        return True
    if settings.device != "auto" or not os.path.exists("/proc/driver/nvidia/version"):
        return False  # no NVIDIA driver: skip importing torch in the HTTP process
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False
