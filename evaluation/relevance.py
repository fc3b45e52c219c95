"""Who is relevant to whom: the query/candidate pools for both retrieval directions.

text->image: one query per distinct caption; every image carrying that exact caption is relevant.
image->text: one query per image; every caption of that image is relevant.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from data.records import Sample


@dataclass
class CaptionPool:
    """The distinct captions of a sample list and which images carry each one."""

    captions: list[str]
    image_index: list[list[int]]  # caption i -> indices of the images that have it

    @classmethod
    def from_samples(cls, samples: list[Sample]) -> "CaptionPool":
        index: dict[str, list[int]] = {}
        for image_number, sample in enumerate(samples):
            for caption in dict.fromkeys(sample.captions):  # dedupe within one image, keep order
                index.setdefault(caption, []).append(image_number)
        return cls(captions=list(index), image_index=list(index.values()))

    def text_to_image_relevance(self, num_images: int) -> torch.Tensor:
        """Bool [captions, images]."""
        relevance = torch.zeros(len(self.captions), num_images, dtype=torch.bool)
        for caption_number, images in enumerate(self.image_index):
            relevance[caption_number, images] = True
        return relevance

    def image_to_text_relevance(self, num_images: int) -> torch.Tensor:
        """Bool [images, captions]."""
        return self.text_to_image_relevance(num_images).T.contiguous()


def group_relevance(query_groups: list[str | None], candidate_groups: list[str | None]) -> torch.Tensor:
    """Category-level relevance: every candidate of the query's group is relevant."""
    ids = {g: i for i, g in enumerate(dict.fromkeys(g for g in query_groups + candidate_groups if g is not None))}
    q = torch.tensor([ids.get(g, -1) for g in query_groups])
    c = torch.tensor([ids.get(g, -2) for g in candidate_groups])
    return q[:, None] == c[None, :]
