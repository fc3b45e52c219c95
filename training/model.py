"""The dual encoder: two staged encoders, projection heads, a learnable temperature.

`build_model(cfg)` builds it from the `model` config section. With `pretrained=False` only
the architecture is built (used when a checkpoint's weights are loaded right after).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from training.encoders import ImageEncoder, TextEncoder
from training.pretrained import (
    WeightsUnavailableError,
    efficientnet_lite_state_dict,
    load_bert,
    minilm_tokenizer,
    resnet50_state_dict,
)
from training.zeroshot import ZeroShotReadout, build_readout

MAX_LOGIT_SCALE = math.log(100.0)


class ProjectionHead(nn.Module):
    """Linear, or a two-layer MLP with a residual linear path (stable from step one)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 0, dropout: float = 0.0):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim, bias=False)
        self.mlp = None
        if hidden_dim:
            self.mlp = nn.Sequential(
                nn.LayerNorm(in_dim),
                nn.Linear(in_dim, hidden_dim),
                nn.GELU(),
                nn.Dropout(dropout),
                nn.Linear(hidden_dim, out_dim),
            )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.linear(features)
        return out if self.mlp is None else out + self.mlp(features)


class HeadEnsemble(nn.Module):
    """K projection heads on the same features: [B, F] -> [B, K, D], each member unit norm.

    Trained together, each member with its own contrastive loss (training/loss.py), they differ
    by initialisation and dropout; searching averages their cosines. On Openclipart an ensemble
    of 3 added +0.015 validation MRR and up to +0.02 on domains it never saw (docs/results.md).
    """

    def __init__(self, members: int, in_dim: int, out_dim: int, hidden_dim: int = 0, dropout: float = 0.0):
        super().__init__()
        self.members = nn.ModuleList(ProjectionHead(in_dim, out_dim, hidden_dim, dropout) for _ in range(members))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.stack([F.normalize(head(features).float(), dim=-1) for head in self.members], dim=1)


class DualEncoder(nn.Module):
    """Two encoders into one unit-norm space.

    With a zero-shot readout (`zeroshot_weight` w > 0) the embedding is the concatenation
    [sqrt(1-w) * head(x), sqrt(w) * readout(x)] of two unit vectors, so it stays unit norm and
    a cosine is (1-w) * head cosine + w * readout cosine. The readout is fixed: training moves
    only the heads, and what the backbones knew before training keeps weight w everywhere.
    With w = 1 there are no heads: the zero-shot model.

    `train_zeroshot_weight` is the share used in training mode (default: w). Training at a high
    w starves the heads: their part of every logit is (1-w) * logit_scale, and the scale is capped
    at 100, so they learn with a softened loss. Training at a lower weight and embedding at w
    keeps both: the heads learn at full strength, the readout keeps its say when searching.

    With `head_members` K > 1 each side has K heads (HeadEnsemble). Searching embeds
    [sqrt(1-w) * (h_1 .. h_K) / sqrt(K), sqrt(w) * readout]: the head cosine is the members'
    mean. Training mode returns [B, K, D]: member k's own embedding [sqrt(1-w) h_k, sqrt(w) r],
    one contrastive loss per member, so they learn as K separate models would.
    """

    def __init__(self, image_encoder: ImageEncoder, text_encoder: TextEncoder, embed_dim: int,
                 head_hidden_dim: int = 0, head_dropout: float = 0.0, init_temperature: float = 0.07,
                 readout: ZeroShotReadout | None = None, zeroshot_weight: float = 0.0,
                 train_zeroshot_weight: float | None = None, head_members: int = 1):
        super().__init__()
        if not 0.0 <= zeroshot_weight <= 1.0 or (zeroshot_weight > 0) != (readout is not None):
            raise ValueError(f"zeroshot weight must be in [0, 1] and > 0 exactly when a readout is given, "
                             f"got {zeroshot_weight}")
        train_zeroshot_weight = zeroshot_weight if train_zeroshot_weight is None else train_zeroshot_weight
        if not 0.0 <= train_zeroshot_weight <= 1.0 or (train_zeroshot_weight == 1.0) != (zeroshot_weight == 1.0):
            raise ValueError(f"zeroshot train_weight must be in [0, 1), or 1 with weight 1; got {train_zeroshot_weight}")
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.readout = readout
        self.zeroshot_weight = zeroshot_weight
        self.train_zeroshot_weight = train_zeroshot_weight
        if head_members < 1:
            raise ValueError(f"model.head.members must be >= 1, got {head_members}")
        self.has_heads = zeroshot_weight < 1.0
        self.head_members = head_members if self.has_heads else 0
        if self.has_heads:
            def head(in_dim):
                if head_members == 1:  # a plain head: the state dict of checkpoints made before ensembles
                    return ProjectionHead(in_dim, embed_dim, head_hidden_dim, head_dropout)
                return HeadEnsemble(head_members, in_dim, embed_dim, head_hidden_dim, head_dropout)
            self.image_head = head(image_encoder.out_dim)
            self.text_head = head(text_encoder.out_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.embed_dim = embed_dim * self.head_members + (readout.out_dim if readout is not None else 0)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.embed_image_prefix(self.image_encoder.forward_prefix(pixels))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.embed_text_prefix(self.text_encoder.forward_prefix(input_ids, attention_mask))

    def embed_image_prefix(self, prefix) -> torch.Tensor:
        """From the frozen prefix's output (possibly cached) to a unit-norm embedding."""
        features = self.image_encoder.forward_suffix(prefix)
        readout = self.readout(features) if self.readout is not None else None
        return self._combine(self.image_head(features) if self.has_heads else None, readout)

    def embed_text_prefix(self, prefix) -> torch.Tensor:
        features = self.text_encoder.forward_suffix(prefix)
        # The readout lives in the frozen text encoder's own space: the text side is its output.
        readout = F.normalize(features.float(), dim=-1) if self.readout is not None else None
        return self._combine(self.text_head(features) if self.has_heads else None, readout)

    def _combine(self, projected: torch.Tensor | None, readout: torch.Tensor | None) -> torch.Tensor:
        if projected is None:
            return readout
        if projected.dim() == 3:  # ensemble members [B, K, D], each already unit norm
            if self.training:
                return self._join(projected, None if readout is None else readout[:, None].expand(-1, projected.shape[1], -1))
            projected = projected.flatten(1) / math.sqrt(projected.shape[1])
        else:
            projected = F.normalize(projected.float(), dim=-1)
        return self._join(projected, readout)

    def _join(self, projected: torch.Tensor, readout: torch.Tensor | None) -> torch.Tensor:
        if readout is None:
            return projected
        w = self.train_zeroshot_weight if self.training else self.zeroshot_weight
        return torch.cat([math.sqrt(1.0 - w) * projected, math.sqrt(w) * readout], dim=-1)

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """In place, after each optimizer step: clamping inside forward would kill its gradient."""
        self.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)

    def pretrained_parameters(self):
        return [p for m in (self.image_encoder, self.text_encoder) for p in m.parameters() if p.requires_grad]

    def new_parameters(self):
        heads = (self.image_head, self.text_head) if self.has_heads else ()
        return [p for m in heads for p in m.parameters()] + [self.logit_scale]


# --- image encoders -------------------------------------------------------------------------

def _resnet_stages(net) -> list[nn.Module]:
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    return [stem, net.layer1, net.layer2, net.layer3, net.layer4]


def build_image_encoder(cfg, pretrained: bool) -> tuple[ImageEncoder, nn.Linear]:
    """The staged encoder and the backbone's own ImageNet classifier (for the zero-shot readout)."""
    arch = cfg.arch
    pooled_stages = cfg.get("pooled_stages", 1)  # absent from checkpoints made before the option
    if arch == "resnet50":
        from torchvision.models import resnet50

        net = resnet50(weights=None)
        if pretrained:
            state = resnet50_state_dict(cfg.get("weights_path"))
            try:
                net.load_state_dict(state)
            except RuntimeError as error:  # another architecture's file: say so instead of a traceback
                raise WeightsUnavailableError(f"{cfg.get('weights_path') or 'the ResNet50 weights'} is not a "
                                              f"torchvision ResNet50 state dict: {str(error)[:300]}") from None
        return ImageEncoder(_resnet_stages(net), 2048, cfg.trainable_stages, pooled_stages), net.fc
    if arch in ("tf_efficientnet_lite0", "tf_efficientnet_lite2"):
        import timm

        net = timm.create_model(arch, pretrained=False)
        if pretrained:
            source = efficientnet_lite_state_dict(int(arch[-1]), cfg.get("weights_path"))
            net.load_state_dict(_map_by_order(source, net.state_dict(), arch))
        stages = [nn.Sequential(net.conv_stem, net.bn1), *net.blocks, nn.Sequential(net.conv_head, net.bn2)]
        return ImageEncoder(stages, net.num_features, cfg.trainable_stages, pooled_stages), net.classifier
    if arch == "tiny_resnet":
        from torchvision.models.resnet import BasicBlock, ResNet

        if pretrained:
            raise WeightsUnavailableError("the tiny recipe has no pretrained weights; set model.image.pretrained=false")
        net = ResNet(BasicBlock, [1, 1, 1, 1], width_per_group=64)
        return ImageEncoder(_resnet_stages(net), 512, cfg.trainable_stages, pooled_stages), net.fc
    raise ValueError(f"unknown image encoder arch {arch!r}")


def _map_by_order(source: dict, target: dict, arch: str = "tf_efficientnet_lite0") -> dict:
    """Rename a state dict whose tensors come in the same order and shapes as the target's.

    The packaged EfficientNet-Lite0/Lite2 weights use EfficientNet-PyTorch names (`_blocks.3...`,
    `_fc`); timm's `tf_efficientnet_lite0/2` hold the same tensors in the same order (same TF
    padding), the 1000-class head last. Tensor kinds (weight, bias, running_mean...) must agree too.
    """
    if (len(source) != len(target)
            or any(s.shape != t.shape for s, t in zip(source.values(), target.values()))
            or any(a.rsplit(".", 1)[-1] != b.rsplit(".", 1)[-1] for a, b in zip(source, target))):
        raise WeightsUnavailableError(f"the EfficientNet-Lite weights given do not match timm's {arch} architecture")
    return dict(zip(target.keys(), source.values()))


# --- text encoders --------------------------------------------------------------------------

def build_text_encoder(cfg, pretrained: bool, bert_config: dict | None = None):
    """The encoder and its tokenizer. `bert_config` (from a checkpoint) builds the bare architecture."""
    from transformers import BertConfig, BertModel

    if bert_config is not None:
        bert = BertModel(BertConfig.from_dict(bert_config), add_pooling_layer=False)
        return TextEncoder(bert, cfg.trainable_layers, cfg.pooling), None
    if cfg.arch == "bert":
        if not pretrained:
            raise ValueError("a bert text encoder without pretrained weights needs a checkpoint's config")
        bert, tokenizer = load_bert(cfg.name_or_path)
        return TextEncoder(bert, cfg.trainable_layers, cfg.pooling), tokenizer
    if cfg.arch == "tiny_bert":
        tokenizer = minilm_tokenizer()
        config = BertConfig(
            vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads, intermediate_size=cfg.hidden_size * 2,
            max_position_embeddings=cfg.max_tokens,
            # BertConfig's default 0.1; 0 makes a step deterministic (the DDP equivalence test).
            hidden_dropout_prob=cfg.get("dropout", 0.1), attention_probs_dropout_prob=cfg.get("dropout", 0.1),
        )
        return TextEncoder(BertModel(config, add_pooling_layer=False), cfg.trainable_layers, cfg.pooling), tokenizer
    raise ValueError(f"unknown text encoder arch {cfg.arch!r}")


def build_model(cfg, pretrained: bool = True, bert_config: dict | None = None):
    """The DualEncoder and its tokenizer from the `model` config section.

    With `pretrained=False` (a checkpoint's weights follow) the zero-shot class embeddings are
    left empty too: they are part of the checkpoint.
    """
    image_encoder, classifier = build_image_encoder(cfg.image, pretrained and cfg.image.pretrained)
    text_encoder, tokenizer = build_text_encoder(cfg.text, pretrained and cfg.text.pretrained, bert_config)
    zeroshot = cfg.get("zeroshot") or {"weight": 0.0}  # absent from checkpoints made before the option
    readout = None
    if zeroshot["weight"] > 0:
        readout = build_readout(zeroshot, classifier, text_encoder, tokenizer, cfg.text.max_tokens,
                                compute=pretrained)
    model = DualEncoder(
        image_encoder, text_encoder, cfg.embed_dim, cfg.head.hidden_dim, cfg.head.dropout, cfg.init_temperature,
        readout, float(zeroshot["weight"]), zeroshot.get("train_weight"), int(cfg.head.get("members", 1)),
    )
    return model, tokenizer
