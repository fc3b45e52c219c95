"""Request and response models of the gallery API (they are what `/docs` shows).

The four original request bodies are kept exactly: `{"user_name"}`, `{"image_path"}`,
`{"folder_path"}`, `{"query"}`; everything added to them is optional.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_TOP_K = 10
MAX_TOP_K = 100
MAX_OFFSET = 1000
MAX_LIST_LIMIT = 1000
MAX_LIST_OFFSET = 1_000_000_000  # Chroma takes a u32 offset; a bigger one was a 500 (issue 9)
MAX_PATH_CHARS = 4096
DEFAULT_NEGATIVE_WEIGHT = 0.7


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------- requests


class InitializeRequest(_Request):
    user_name: str = Field(min_length=1, max_length=128, description="A name for the gallery (not secret).",
                           examples=["my_gallery"])


class AddImageRequest(_Request):
    image_path: str = Field(min_length=1, max_length=MAX_PATH_CHARS, description="Absolute path on the server.",
                            examples=["/home/me/Pictures/beach.jpg"])


class AddFolderRequest(_Request):
    folder_path: str = Field(min_length=1, max_length=MAX_PATH_CHARS,
                             description="Absolute folder path on the server; sub-folders are included.",
                             examples=["/home/me/Pictures"])


class SearchRequest(_Request):
    query: str = Field(min_length=1, max_length=1000, examples=["a person walking on the beach at sunset"])
    top_k: int = Field(DEFAULT_TOP_K, ge=1, le=MAX_TOP_K, description="Results per page.")
    offset: int = Field(0, ge=0, le=MAX_OFFSET, description="Results to skip (paging).")
    min_score: float | None = Field(None, ge=-1.0, le=1.0, description="Drop results with a lower cosine score.")
    folder: str | None = Field(None, min_length=1, max_length=MAX_PATH_CHARS,
                               description="Only images under this absolute folder (any depth).")
    negative: str | None = Field(
        None, max_length=1000, examples=["people"],
        description="Push images matching this text down (rclip style). `-word` tokens in `query` add to it.")
    negative_weight: float = Field(
        DEFAULT_NEGATIVE_WEIGHT, ge=0.0, le=2.0,
        description="The query vector is normalise(q - weight * n), n the negative text's embedding.")


class SearchByImageRequest(_Request):
    """Exactly one of `image_id` (a stored image of this gallery) or `image_path` (a file on the
    server, under the allowed roots). To search by an uploaded file, send multipart/form-data
    with the file in the field `file` (and top_k, offset, min_score, folder as form fields)."""
    image_id: str | None = Field(None, min_length=1, max_length=64, description="A stored image of this gallery.")
    image_path: str | None = Field(None, min_length=1, max_length=MAX_PATH_CHARS,
                                   description="Absolute path on the server (allowed-roots policy applies).")
    top_k: int = Field(DEFAULT_TOP_K, ge=1, le=MAX_TOP_K, description="Results per page.")
    offset: int = Field(0, ge=0, le=MAX_OFFSET, description="Results to skip (paging).")
    min_score: float | None = Field(None, ge=-1.0, le=1.0, description="Drop results with a lower cosine score.")
    folder: str | None = Field(None, min_length=1, max_length=MAX_PATH_CHARS,
                               description="Only images under this absolute folder (any depth).")


class SearchByImageUploadOptions(_Request):
    """The form fields that may come with an uploaded query image (multipart/form-data)."""
    top_k: int = Field(DEFAULT_TOP_K, ge=1, le=MAX_TOP_K)
    offset: int = Field(0, ge=0, le=MAX_OFFSET)
    min_score: float | None = Field(None, ge=-1.0, le=1.0)
    folder: str | None = Field(None, min_length=1, max_length=MAX_PATH_CHARS)


# ---------------------------------------------------------------- responses


class ErrorResponse(BaseModel):
    """Every error answer: `detail` is a sentence for a person, or FastAPI's list of field errors (422)."""
    detail: str | list[dict] = Field(description="What went wrong and what to do; a list of field errors for "
                                                 "an invalid request (422).")


class InitializeResponse(BaseModel):
    user_id: str = Field(description="Pass as ?user_id= on every other request (not a secret).")
    api_key: str | None = Field(None, description="The gallery's API key: returned once, when the gallery is created "
                                                  "(only its hash is stored). Send it as X-API-Key when the server "
                                                  "requires keys.")
    user_name: str
    created: bool = Field(description="False when a gallery with this name already existed.")
    model_id: str = Field(description="Model whose embeddings the gallery holds.")
    server_model_id: str
    needs_reindex: bool = Field(description="True when the gallery was embedded by another model: POST /db/reindex.")
    images: int


class ImageRef(BaseModel):
    id: str
    path: str


class AddImageResponse(BaseModel):
    status: Literal["added", "updated", "unchanged", "duplicate"]
    id: str
    path: str
    duplicate_of: ImageRef | None = Field(None, description="The stored image with identical content (not stored twice).")


class DuplicateFile(BaseModel):
    path: str
    duplicate_of: str
    duplicate_of_id: str


class FailedFile(BaseModel):
    path: str
    reason: str
    status: int = Field(description="The HTTP status this failure would have on /images/add.")


class AddFolderResponse(BaseModel):
    added: int
    removed: int = Field(0, description="Records of files under the folder that are gone from the disk: removed.")
    removed_files: list[ImageRef] = Field(default_factory=list)
    updated: int = Field(description="Files whose content changed since they were added: re-embedded.")
    unchanged: int
    duplicates: int = Field(description="Files identical to a stored image at another path: not stored.")
    failed: int
    ignored: int = Field(description="Files without an image extension.")
    duplicate_files: list[DuplicateFile]
    failed_files: list[FailedFile] = Field(description="The failed files with reasons (the first 1,000).")
    seconds: float
    images_per_second: float


class SearchResult(BaseModel):
    rank: int = Field(description="1-based, counting from the first result of the first page.")
    id: str
    path: str
    score: float = Field(description="Cosine similarity, -1..1 (1 - Chroma's cosine distance).")


class SearchResponse(BaseModel):
    query: str = Field(description="The query as sent (for a search by image: `image:<id>`, `path:<path>` or `upload:<name>`).")
    negative_terms: list[str] = Field(default_factory=list, description="Negative texts that were subtracted.")
    results: list[SearchResult]
    top_k: int
    offset: int
    total_images: int
    model_id: str
    missing_skipped: int = Field(0, description="Nearer records left out because their file is gone from the disk "
                                                "(POST /db/prune removes them).")


class ImageInfo(BaseModel):
    id: str
    path: str
    size: int
    sha256: str
    added_at: float


class ImageDetailResponse(ImageInfo):
    modified_at: float = Field(description="The file's modification time when it was indexed (Unix seconds).")
    width: int | None = Field(description="Pixels, read from the file now (null if it cannot be read).")
    height: int | None
    media_type: str
    exists: bool = Field(description="False when the file is gone since it was indexed.")


class KeyResponse(BaseModel):
    user_id: str
    api_key: str = Field(description="The gallery's new key (shown once); the previous key stops working.")


class RevokeKeyResponse(BaseModel):
    user_id: str
    revoked: bool = Field(description="False when the gallery had no key.")


class PrunedFile(BaseModel):
    id: str
    path: str
    reason: Literal["missing", "changed", "outside_roots"]


class PruneResponse(BaseModel):
    user_id: str
    checked: int
    removed: int = Field(description="Records removed (files gone from the disk); 0 with dry_run.")
    changed: int = Field(description="Files whose size or modification time differ from the record (reported; "
                                     "adding them again re-embeds them).")
    dry_run: bool
    files: list[PrunedFile] = Field(description="Each gone or changed file (at most 1,000 listed).")
    seconds: float


class ImportResponse(BaseModel):
    gallery: str
    user_id: str
    created: bool
    imported: int = Field(description="Records restored (or re-embedded with reindex).")
    reindexed: bool = Field(description="True when the pictures were embedded again from their files.")
    backup_model_id: str
    model_id: str
    failed: int
    failed_files: list[FailedFile]
    images: int
    api_key: str | None = Field(None, description="A new gallery's key (shown once).")


class ListImagesResponse(BaseModel):
    total: int
    offset: int
    limit: int
    images: list[ImageInfo]


class DeleteImageResponse(BaseModel):
    deleted: ImageRef


class ReindexResponse(BaseModel):
    user_id: str
    model_id: str
    previous_model_id: str
    reindexed: int
    failed: int
    failed_files: list[FailedFile]
    skipped: bool = Field(description="True when the gallery already matched the server's model (use force=true).")
    seconds: float


class GalleryInfoResponse(BaseModel):
    user_id: str
    user_name: str
    model_id: str
    server_model_id: str
    needs_reindex: bool
    images: int


class JobStartedResponse(BaseModel):
    job_id: str = Field(description="Poll GET /jobs/{job_id}?user_id=...; cancel with DELETE.")
    state: Literal["queued", "running", "done", "failed", "cancelled"]


class JobResponse(BaseModel):
    job_id: str
    kind: Literal["add-folder"]
    folder: str
    state: Literal["queued", "running", "done", "failed", "cancelled"]
    total: int = Field(description="Image files found (known once the folder walk finished; 0 before).")
    done: int = Field(description="Files handled so far (added, updated, unchanged, duplicate or failed).")
    added: int
    updated: int
    unchanged: int
    duplicates: int
    failed: int
    ignored: int
    removed: int = Field(0, description="Records of files gone from the folder, removed when the walk ended.")
    failed_files: list[FailedFile]
    images_per_second: float = Field(description="Files handled per second since the job started.")
    created_at: float
    started_at: float | None
    finished_at: float | None
    error: str | None = Field(None, description="Why the job failed (state failed).")
