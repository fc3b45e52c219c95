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
API key and body size, and forward; they never open the store. Scaling past one machine would
mean Chroma's client/server mode instead of the embedded store.
"""

import asyncio
import faulthandler
import logging
import os
import secrets
import signal
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import litserve as ls
from fastapi import File, HTTPException, Path, Query, Request, Security, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.datastructures import UploadFile as StarletteUploadFile
from litserve.callbacks.base import EventTypes
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, ResponseBufferItem

from serving.config import ServeSettings, configure_logging
from serving.schemas import (
    MAX_LIST_LIMIT,
    AddFolderRequest,
    AddFolderResponse,
    AddImageRequest,
    AddImageResponse,
    DeleteImageResponse,
    GalleryInfoResponse,
    ImageDetailResponse,
    InitializeRequest,
    InitializeResponse,
    JobResponse,
    JobStartedResponse,
    ListImagesResponse,
    ReindexResponse,
    SearchByImageRequest,
    SearchByImageUploadOptions,
    SearchRequest,
    SearchResponse,
)

logger = logging.getLogger(__name__)

QUEUE_KEY = "/_gallery"  # the spec's request-queue key; no route is registered at this path
USER_ID = Query(min_length=1, max_length=128, description="The id /db/initialize returned.")
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="The server's API key, if it has one.")
_bearer = HTTPBearer(auto_error=False, description="The server's API key as a bearer token, if it has one.")
IMAGE_ID = Path(min_length=1, max_length=64, description="An image id of this gallery (another gallery's id is a 404).")
JOB_ID = Path(min_length=1, max_length=64)
WEB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web")
UPLOAD_PATHS = ("/images/upload", "/images/search-by-image")  # bodies up to max_upload_bytes
THUMBNAIL_CACHE_CONTROL = "private, max-age=3600"
FILE_CACHE_CONTROL = "private, no-cache"  # revalidate with the ETag: the file may change in place
_IMAGE_CONTENT = {"content": {"image/*": {"schema": {"type": "string", "format": "binary"}}},
                  "description": "The image bytes (ETag and Cache-Control headers; 304 on a matching If-None-Match)."}


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
        ("/images/search-by-image", "POST"): {"openapi_extra": {"requestBody": {"required": True, "content": {
            "application/json": {"schema": SearchByImageRequest.model_json_schema()},
            "multipart/form-data": {"schema": _multipart_schema(SearchByImageUploadOptions)},
        }}}},
    }

    def __init__(self):
        super().__init__()
        self.api_path = QUEUE_KEY

    def pre_setup(self, lit_api: "ls.LitAPI"):
        for path, endpoint, methods in (
            ("/db/initialize", self.initialize, ["POST"]),
            ("/db/info", self.info, ["GET"]),
            ("/db/reindex", self.reindex, ["POST"]),
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

    async def _call(self, op: str, **args) -> dict:
        """Send one operation to the worker and wait for its answer."""
        uid = uuid.uuid4().hex
        event = asyncio.Event()
        self.response_buffer[uid] = ResponseBufferItem(event=event)  # registered before it can be answered
        try:
            if self._server is not None:
                self._server._callback_runner.trigger_event(
                    EventTypes.ON_REQUEST.value, active_requests=self._server.active_requests, litserver=self._server
                )
            self.request_queue.put((self.response_queue_id, uid, time.monotonic(), {"op": op, "args": args}))
            await event.wait()
            response, status = self.response_buffer[uid].response
        finally:
            self.response_buffer.pop(uid, None)
        if status == LitAPIStatus.ERROR:
            if isinstance(response, HTTPException):
                raise response
            logger.error("gallery operation %s failed: %r", op, response)
            raise HTTPException(500, "internal error in the gallery worker; see the server log")
        return response

    async def initialize(self, body: InitializeRequest) -> InitializeResponse:
        """Create a gallery (or find the existing one with this name) and return its user_id.

        The user_id is random (uuid4); the name is not a secret: initializing an existing name
        returns its user_id again. Use the API key to control who may call the server at all."""
        return InitializeResponse(**await self._call("initialize", user_name=body.user_name))

    async def info(self, user_id: str = USER_ID) -> GalleryInfoResponse:
        """The gallery's name, size and model id (and whether it needs a re-index)."""
        return GalleryInfoResponse(**await self._call("info", user_id=user_id))

    async def reindex(self, user_id: str = USER_ID, force: bool = Query(False, description="Re-embed even if the model matches.")) -> ReindexResponse:
        """Re-embed every stored image with the server's model (after a model change).

        Fills a new collection from the stored paths and switches to it at the end, so a failure
        leaves the old one intact. Files that can no longer be read are listed and dropped."""
        return ReindexResponse(**await self._call("reindex", user_id=user_id, force=force))

    async def add_image(self, body: AddImageRequest, user_id: str = USER_ID) -> AddImageResponse:
        """Add one image file (a no-op if unchanged; not stored if identical to a stored image).

        Errors: 400 relative path or not a regular file, 403 outside the allowed roots,
        404 missing file or unknown user_id, 409 gallery embedded by another model,
        413 image too large (decompression-bomb guard), 415 not an image, 422 corrupt/truncated."""
        return AddImageResponse(**await self._call("add_image", user_id=user_id, image_path=body.image_path))

    async def add_folder(self, body: AddFolderRequest, user_id: str = USER_ID,
                         background: bool = Query(False, description="Run as a job: 202 with its job_id at once.")
                         ) -> AddFolderResponse:
        """Add every image under a folder, sub-folders included (jpg, jpeg, png, webp, bmp, gif, tif, tiff).

        Files that fail are listed with their reason and status while the rest are added.
        With `background=true` the request is checked the same way, then answered 202 with a
        `job_id`: follow it with GET /jobs/{job_id}, cancel it with DELETE /jobs/{job_id}.
        Errors: 400 not a folder, 403 outside the allowed roots, 404 missing folder or unknown
        user_id, 409 gallery embedded by another model."""
        if background:
            started = await self._call("add_folder_job", user_id=user_id, folder_path=body.folder_path)
            return JSONResponse(JobStartedResponse(**started).model_dump(), status_code=202)
        return AddFolderResponse(**await self._call("add_folder", user_id=user_id, folder_path=body.folder_path))

    async def search(self, body: SearchRequest, user_id: str = USER_ID) -> SearchResponse:
        """Images ranked by cosine similarity to a text query (top_k <= 100, offset paging,
        optional min_score and folder filter).

        Negative terms: `-word` tokens in `query` and the `negative` text push matching images
        down: the query vector becomes normalise(q - negative_weight * n), n the normalised mean
        embedding of the negative texts (as rclip does). Errors: 404 unknown user_id, 409 gallery
        embedded by another model (re-index it), 422 invalid parameters or only negative terms."""
        return SearchResponse(**await self._call("search", user_id=user_id, **body.model_dump()))

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
            except ValidationError as error:
                raise RequestValidationError(error.errors(include_url=False)) from None
            args = body.model_dump()
        return SearchResponse(**await self._call("search_by_image", user_id=user_id, **args))

    async def upload(self, file: UploadFile = File(description="An image file (jpg, png, webp, bmp, gif, tiff)."),
                     user_id: str = USER_ID) -> AddImageResponse:
        """Upload an image: saved under the store folder (uploads/<user_id>/) and added.

        Errors: 413 over max_upload_bytes (32 MiB by default) or over 89 MP, 415 not an image,
        422 corrupt, truncated or empty."""
        data = await file.read()
        return AddImageResponse(**await self._call("upload", user_id=user_id, data=data, filename=file.filename))

    async def image_info(self, image_id: str = IMAGE_ID, user_id: str = USER_ID) -> ImageDetailResponse:
        """One stored image: path, size, dates, pixel size."""
        return ImageDetailResponse(**await self._call("image_info", user_id=user_id, image_id=image_id))

    async def thumbnail(self, request: Request, image_id: str = IMAGE_ID, user_id: str = USER_ID):
        """A JPEG thumbnail (long side `thumbnail_size`, 256 px by default), cached on disk."""
        info = await self._call("thumbnail", user_id=user_id, image_id=image_id)
        return _file_response(request, info, THUMBNAIL_CACHE_CONTROL)

    async def image_file(self, request: Request, image_id: str = IMAGE_ID, user_id: str = USER_ID):
        """The original image file, with its content type."""
        info = await self._call("image_file", user_id=user_id, image_id=image_id)
        return _file_response(request, info, FILE_CACHE_CONTROL, filename=os.path.basename(info["path"]))

    async def job(self, job_id: str = JOB_ID, user_id: str = USER_ID) -> JobResponse:
        """A background job's state (queued, running, done, failed, cancelled) and progress."""
        return JobResponse(**await self._call("job", user_id=user_id, job_id=job_id))

    async def cancel_job(self, job_id: str = JOB_ID, user_id: str = USER_ID) -> JobResponse:
        """Cancel a job: it stops after the batch in hand (every stored batch stays whole and
        searchable; adding the folder again finishes the rest). A job that already ended is
        returned unchanged."""
        return JobResponse(**await self._call("cancel_job", user_id=user_id, job_id=job_id))

    async def list_images(self, user_id: str = USER_ID, offset: int = Query(0, ge=0),
                          limit: int = Query(100, ge=1, le=MAX_LIST_LIMIT)) -> ListImagesResponse:
        """The stored images, paged."""
        return ListImagesResponse(**await self._call("list_images", user_id=user_id, offset=offset, limit=limit))

    async def delete_image(self, image_id: str = Path(min_length=1, max_length=64), user_id: str = USER_ID
                           ) -> DeleteImageResponse:
        """Remove one image from the gallery (the file is not touched)."""
        return DeleteImageResponse(**await self._call("delete_image", user_id=user_id, image_id=image_id))


def _validated(model, values: dict):
    try:
        return model.model_validate(values)
    except ValidationError as error:
        raise RequestValidationError(error.errors(include_url=False)) from None


def _file_response(request: Request, info: dict, cache_control: str, filename: str | None = None) -> Response:
    etag = f'"{info["etag"]}"'
    headers = {"ETag": etag, "Cache-Control": cache_control}
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

    app.add_api_route("/", index, methods=["GET"], include_in_schema=False, response_class=FileResponse)
    app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")


class GalleryAPI(ls.LitAPI):
    """The one worker that owns the store and the model (see the module docstring)."""

    def __init__(self, settings: ServeSettings, executor_threads: int = 8):
        super().__init__(spec=GallerySpec(), enable_async=True, max_batch_size=1)
        self.settings = settings
        self.api_key = settings.api_key
        self.executor_threads = executor_threads
        self.healthcheck_path = "/health"
        self.gallery = None

    # ------------------------------------------------ HTTP process side (LitServe calls it per request)

    def authorize(self, request: Request, x_api_key: Optional[str] = Security(_api_key_header),
                  bearer: Optional[HTTPAuthorizationCredentials] = Security(_bearer)):
        if not self.api_key or request.url.path == self.healthcheck_path:
            return
        supplied = x_api_key or (bearer.credentials if bearer else None)
        if not supplied or not secrets.compare_digest(supplied.encode(), str(self.api_key).encode()):
            raise HTTPException(
                401, "missing or wrong API key: send it as 'X-API-Key: <key>' or 'Authorization: Bearer <key>'",
                headers={"WWW-Authenticate": "Bearer"},
            )

    # ------------------------------------------------ worker process side

    def setup(self, device):
        from serving.gallery import Gallery

        configure_logging(self.settings.log_level)
        self.stop = threading.Event()
        self._busy = _Busy()
        _install_worker_signals(self.stop, self._busy)
        settings = self.settings
        if settings.device == "auto":
            settings = ServeSettings.from_mapping({**settings.to_dict(), "device": str(device)})
        self._executor = ThreadPoolExecutor(self.executor_threads, thread_name_prefix="gallery")
        self.gallery = Gallery.open(settings, stop=self.stop)
        logger.info("gallery worker ready: model %s, store %s", self.gallery.model_id, settings.db_dir)

    async def decode_request(self, request, **kwargs):
        if not isinstance(request, dict) or "op" not in request:
            raise HTTPException(400, "malformed gallery request")
        return request

    async def predict(self, request, **kwargs):
        from serving.errors import GalleryError
        from serving.ingest import IngestCancelled

        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self._dispatch, request)
        except GalleryError as error:
            raise HTTPException(error.status_code, error.detail) from None
        except IngestCancelled as error:
            raise HTTPException(503, str(error)) from None

    async def encode_response(self, output, **kwargs):
        return output

    def _dispatch(self, request: dict) -> dict:
        with self._busy:
            return self.gallery.dispatch(request)


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
    api = GalleryAPI(settings)
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
    apply_route_options(server.app, GallerySpec.ROUTE_OPTIONS)
    install_web_page(server.app)
    server.uvicorn_graceful_timeout = settings.graceful_shutdown_s
    return server


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
