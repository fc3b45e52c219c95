"""The zero-shot readout: search that works on everyday photos with no training at all.

The image backbone already knows 1,000 ImageNet classes and the text encoder already knows
what words mean. Reading an image as "its class probabilities times the text embeddings of
the class names" puts it in the text encoder's own space, where any query can be compared
with it. That costs one matrix product per image and needs no image-text pairs.

Trained heads forget this outside the training domain (clip art heads score below it on
photos), so the readout also serves as a *fixed* part of a trained model's embedding (see
`DualEncoder`): the heads learn the domain, the readout keeps what the backbones know.

`python -m training.zeroshot [model=effnet_minilm]` writes an ordinary checkpoint of the
readout alone, evaluated and served like any trained one.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


def imagenet_class_texts(names: str) -> list[list[str]]:
    """For each ImageNet-1k class (in the classifier's order), the texts that name it.

    `names`: "first" - the first WordNet lemma ("goldfish"); "lemmas" - every lemma written in
    lower case (synonyms, no Latin binomials); "gloss" - the first lemma with its WordNet
    definition ("goldfish: small golden or orange-red freshwater fishes..."). The lemmas and
    definitions ship with timm (ImageNet ids are WordNet ids), so nothing is downloaded.
    """
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    texts = []
    for index in range(info.num_classes()):
        lemmas = [lemma.strip() for lemma in info.index_to_description(index).split(",")]
        lemmas = [lemma for lemma in lemmas if lemma] or [info.index_to_label_name(index)]
        if names == "first":
            texts.append(lemmas[:1])
        elif names == "lemmas":
            texts.append([lemma for lemma in lemmas if lemma == lemma.lower()] or lemmas[:1])
        elif names == "gloss":
            definition = info.index_to_description(index, detailed=True).split(":", 1)[-1].strip()
            texts.append([f"{lemmas[0]}: {definition}"])
        else:
            raise ValueError(f"zeroshot.class_names must be first, lemmas or gloss, got {names!r}")
    return texts


@torch.no_grad()
def class_text_embeddings(text_encoder, tokenizer, class_texts: list[list[str]], templates: list[str],
                          max_tokens: int, batch_size: int = 512, center: bool = False) -> torch.Tensor:
    """[classes, D]: per class, the normalised mean of its (template x name) text embeddings.

    `center` subtracts the mean over classes. Every class name shares a large common direction
    in the text space, so uncentred readouts of all images point almost the same way and their
    cosines with a query differ little; centred, the readout is p @ E - mean(E) (p sums to 1),
    which ranks the same way per class but spreads images apart.
    """
    from data.transforms import tokenize

    prompts = [[template.format(text) for text in texts for template in templates] for texts in class_texts]
    flat = [prompt for group in prompts for prompt in group]
    was_training = text_encoder.training
    text_encoder.eval()
    embeddings = []
    for start in range(0, len(flat), batch_size):
        tokens = tokenize(tokenizer, flat[start : start + batch_size], max_tokens)
        embeddings.append(F.normalize(text_encoder(tokens["input_ids"], tokens["attention_mask"]).float(), dim=-1))
    text_encoder.train(was_training)
    embeddings = torch.cat(embeddings)
    sizes = torch.tensor([len(group) for group in prompts])
    owner = torch.repeat_interleave(torch.arange(len(prompts)), sizes)
    sums = torch.zeros(len(prompts), embeddings.shape[1]).index_add_(0, owner, embeddings)
    embeddings = F.normalize(sums, dim=-1)
    return embeddings - embeddings.mean(0) if center else embeddings


class ZeroShotReadout(nn.Module):
    """Image features -> ImageNet class probabilities -> their mix of class-name text embeddings.

    Everything here is fixed (buffers, not parameters): the backbone's own classifier and the
    class-name embeddings computed once by the frozen text encoder, saved with the checkpoint.
    `last_width` picks the last stage's pooled features out of a multi-stage concatenation.
    """

    def __init__(self, classifier: nn.Linear, class_embeddings: torch.Tensor, temperature: float = 1.0):
        super().__init__()
        self.register_buffer("classifier_weight", classifier.weight.detach().clone())
        self.register_buffer("classifier_bias", classifier.bias.detach().clone())
        self.register_buffer("class_embeddings", class_embeddings.detach().clone())
        self.last_width = classifier.in_features
        self.temperature = temperature

    @property
    def out_dim(self) -> int:
        return self.class_embeddings.shape[1]

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        features = image_features[:, -self.last_width :].float()
        logits = F.linear(features, self.classifier_weight.float(), self.classifier_bias.float())
        probabilities = torch.softmax(logits / self.temperature, dim=-1)
        return F.normalize(probabilities @ self.class_embeddings.float(), dim=-1)


def build_readout(cfg, classifier: nn.Linear, text_encoder, tokenizer, max_tokens: int,
                  compute: bool) -> ZeroShotReadout:
    """The readout of `model.zeroshot`; `compute=False` leaves the class embeddings to a checkpoint."""
    if not text_encoder.fully_frozen:
        raise ValueError("model.zeroshot.weight > 0 needs a frozen text encoder (model.text.trainable_layers=0): "
                         "the class-name embeddings are made by the frozen text encoder")
    if compute:
        class_texts = imagenet_class_texts(cfg.class_names)
        log.info("zero-shot readout: embedding %d class names x %d templates", len(class_texts), len(cfg.templates))
        embeddings = class_text_embeddings(text_encoder, tokenizer, class_texts, list(cfg.templates), max_tokens,
                                           center=bool(cfg.get("center", False)))
    else:
        embeddings = torch.zeros(classifier.out_features, text_encoder.out_dim)
    return ZeroShotReadout(classifier, embeddings, cfg.temperature)


@hydra.main(version_base="1.3", config_path="../configs", config_name="zeroshot")
def main(cfg) -> Path:
    """Write the zero-shot checkpoint: the readout alone, no trained part."""
    from omegaconf import OmegaConf

    from training.checkpoint import save_checkpoint
    from training.loop import preprocessing_of
    from training.model import build_model

    model_cfg = OmegaConf.merge(cfg.model, {"zeroshot": {"weight": 1.0}})
    model, tokenizer = build_model(model_cfg)
    output = Path(cfg.output_dir)
    model_id = save_checkpoint(output, model.eval(), tokenizer, model_cfg, preprocessing_of(model_cfg),
                               extra={"zeroshot": True, "datasets": []})
    log.info("zero-shot checkpoint %s written to %s", model_id, output)
    print(f"zero-shot checkpoint ({model_id}): {output}")
    return output


if __name__ == "__main__":
    main()
