"""Image and text preprocessing, built from a checkpoint's `preprocessing` section.

The image statistics (mean/std) must be those the backbone was pretrained with, so they live
in the model recipe config and travel inside every checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torchvision import transforms as T


@dataclass(frozen=True)
class Preprocessing:
    image_size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    max_tokens: int = 32
    resize: str = "crop"  # crop: short side to image_size, centre crop; squash: whole picture to a square

    @classmethod
    def from_dict(cls, values: dict) -> "Preprocessing":
        return cls(
            image_size=int(values["image_size"]),
            mean=tuple(float(v) for v in values["mean"]),
            std=tuple(float(v) for v in values["std"]),
            max_tokens=int(values["max_tokens"]),
            resize=str(values.get("resize", "crop")),  # absent from checkpoints made before the option
        )

    def to_dict(self) -> dict:
        values = asdict(self)
        values["mean"], values["std"] = list(self.mean), list(self.std)
        if self.resize == "crop":
            del values["resize"]  # the default: keeps feature-cache keys of crop runs as they were
        return values


def eval_transform(pre: Preprocessing) -> T.Compose:
    """What evaluation and serving use: resize the short side and centre-crop (`resize=crop`), or
    resize the whole picture to a square (`resize=squash`: nothing at the edges is cut off, at the
    cost of distorting the aspect ratio); then normalise."""
    if pre.resize == "crop":
        resize = [T.Resize(pre.image_size, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                  T.CenterCrop(pre.image_size)]
    elif pre.resize == "squash":
        resize = [T.Resize((pre.image_size, pre.image_size), interpolation=T.InterpolationMode.BICUBIC, antialias=True)]
    else:
        raise ValueError(f"model.image.resize must be crop or squash, got {pre.resize!r}")
    return T.Compose([*resize, T.ToTensor(), T.Normalize(pre.mean, pre.std)])


def train_transform(pre: Preprocessing, scale: tuple[float, float] = (0.6, 1.0), hflip: bool = True) -> T.Compose:
    """Random resized crop and horizontal flip for training augmentation."""
    steps = [T.RandomResizedCrop(pre.image_size, scale=scale, interpolation=T.InterpolationMode.BICUBIC, antialias=True)]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(pre.mean, pre.std)]
    return T.Compose(steps)


def tokenize(tokenizer, texts: list[str], max_tokens: int) -> dict[str, torch.Tensor]:
    """Pad to the longest text in the batch (not to max_tokens): short queries stay cheap."""
    batch = tokenizer(
        list(texts), padding=True, truncation=True, max_length=max_tokens, return_tensors="pt"
    )
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
