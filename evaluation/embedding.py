"""Embedding an evaluation set with a loaded checkpoint: images (skipping unreadable ones) and texts.

Images go through the checkpoint's own eval transform in a DataLoader (decoding in
`num_workers` processes); an image that cannot be read is logged once, counted, and left
out of the candidate pool instead of failing the run.

`encode=` swaps the per-batch function and keeps the batching, order and failure handling
(evaluation.suite computes a shared frozen backbone's output with it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from data.dataset import FailureLog, readable_image_batches


@dataclass
class ImageEmbeddings:
    """Embeddings of the readable images of a path list, in input order."""

    embeddings: torch.Tensor          # [N_ok, D] float32, unit norm
    indices: list[int]                # position in the input list of each embedded row
    failures: dict[str, str] = field(default_factory=dict)  # path -> reason, for the skipped ones

    def __len__(self) -> int:
        return len(self.indices)


def embed_image_paths(checkpoint, paths: list[str], batch_size: int = 64, num_workers: int = 2,
                      progress: bool = True, desc: str = "embedding images",
                      encode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> ImageEmbeddings:
    """Embed every readable image of `paths` with `checkpoint` (a training.checkpoint.LoadedCheckpoint).

    `encode` (pixels -> [B, D] float32 on CPU) replaces `checkpoint.embed_images`."""
    encode = encode or checkpoint.embed_images
    failures = FailureLog()
    chunks: list[torch.Tensor] = []
    indices: list[int] = []
    for batch_indices, pixels in readable_image_batches(list(paths), checkpoint.image_transform,
                                                        checkpoint.preprocessing.image_size, batch_size, num_workers,
                                                        failures, desc if progress else None):
        chunks.append(encode(pixels))
        indices.extend(batch_indices.tolist())
    dim = chunks[0].shape[1] if chunks else 0
    embeddings = torch.cat(chunks) if chunks else torch.zeros(0, dim)
    # DataLoader keeps batch order, but sort anyway so row i always matches indices[i] ascending.
    order = sorted(range(len(indices)), key=indices.__getitem__)
    return ImageEmbeddings(embeddings[order], [indices[i] for i in order], dict(failures.reasons))


def embed_texts(checkpoint, texts: list[str], batch_size: int = 256, progress: bool = True,
                desc: str = "embedding captions",
                encode: Callable[[list[str]], torch.Tensor] | None = None) -> torch.Tensor:
    """[len(texts), D] float32 unit-norm text embeddings (`encode` replaces `checkpoint.embed_texts`)."""
    encode = encode or checkpoint.embed_texts
    chunks = []
    with tqdm(total=len(texts), desc=desc, unit="text", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(texts), batch_size):
            batch = texts[start:start + batch_size]
            chunks.append(encode(batch))
            bar.update(len(batch))
    return torch.cat(chunks) if chunks else torch.zeros(0, 0)
