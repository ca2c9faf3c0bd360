"""Builders for torchvision Mask R-CNN variants, configured from a model card.

Every variant keeps tiles at their native resolution (no resizing inside the model): the pipeline
chooses the resolution, the model only normalises.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection import mask_rcnn as tv_mask_rcnn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, mobilenet_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign

from models.card import ModelCard


class NativeResolutionTransform(GeneralizedRCNNTransform):
    """Normalises and batches images but never resizes them."""

    def resize(self, image, target=None):
        return image, target


def _detection_kwargs(card: ModelCard) -> dict:
    return dict(
        box_score_thresh=card.score_threshold,
        box_detections_per_img=card.max_detections,
        rpn_pre_nms_top_n_test=max(1000, 2 * card.max_detections),
        rpn_post_nms_top_n_test=max(500, card.max_detections + card.max_detections // 2),
        rpn_pre_nms_top_n_train=2000,
        rpn_post_nms_top_n_train=1000,
        box_batch_size_per_image=256,
    )


def _native_transform(card: ModelCard) -> NativeResolutionTransform:
    return NativeResolutionTransform(
        min_size=card.tile_size, max_size=card.tile_size, image_mean=card.input.mean, image_std=card.input.std
    )


def _anchors(card: ModelCard, levels: int) -> AnchorGenerator:
    if levels == len(card.anchor_sizes):
        sizes = tuple((s,) for s in card.anchor_sizes)
    else:
        sizes = (tuple(card.anchor_sizes),) * levels
    return AnchorGenerator(sizes=sizes, aspect_ratios=((0.5, 1.0, 2.0),) * levels)


def _resnet50(card: ModelCard, builder: Callable) -> MaskRCNN:
    model = builder(
        weights=None,
        weights_backbone=None,
        num_classes=card.num_classes,
        **_detection_kwargs(card),
    )
    model.rpn.anchor_generator = _anchors(card, 5)
    model.roi_heads.box_roi_pool.sampling_ratio = model.roi_heads.mask_roi_pool.sampling_ratio = card.roi_sampling_ratio
    model.transform = _native_transform(card)
    return model


def _mobilenet_v3_large(card: ModelCard) -> MaskRCNN:
    backbone = mobilenet_backbone(backbone_name="mobilenet_v3_large", weights=None, fpn=True, trainable_layers=6)
    levels = ["0", "1"]
    model = MaskRCNN(
        backbone,
        num_classes=card.num_classes,
        rpn_anchor_generator=_anchors(card, 3),
        box_roi_pool=MultiScaleRoIAlign(levels, output_size=7, sampling_ratio=card.roi_sampling_ratio),
        mask_roi_pool=MultiScaleRoIAlign(levels, output_size=14, sampling_ratio=card.roi_sampling_ratio),
        **_detection_kwargs(card),
    )
    model.transform = _native_transform(card)
    return model


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class CompactBackbone(nn.Sequential):
    """A narrow four-stage CNN (strides 4, 8, 16, 32) fast enough for CPU inference."""

    def __init__(self, widths: tuple[int, int, int, int] = (32, 64, 96, 128)) -> None:
        c1, c2, c3, c4 = widths
        super().__init__(
            OrderedDict(
                stem=nn.Sequential(_conv_bn(3, 24, 2), _conv_bn(24, c1, 2)),
                layer1=nn.Sequential(_conv_bn(c1, c1), _conv_bn(c1, c1)),
                layer2=nn.Sequential(_conv_bn(c1, c2, 2), _conv_bn(c2, c2)),
                layer3=nn.Sequential(_conv_bn(c2, c3, 2), _conv_bn(c3, c3)),
                layer4=nn.Sequential(_conv_bn(c3, c4, 2), _conv_bn(c4, c4)),
            )
        )
        self.widths = widths


def _compact(card: ModelCard) -> MaskRCNN:
    body = CompactBackbone()
    fpn_channels = 64
    backbone = BackboneWithFPN(
        body,
        return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
        in_channels_list=list(body.widths),
        out_channels=fpn_channels,
    )
    levels = ["0", "1", "2", "3"]
    model = MaskRCNN(
        backbone,
        num_classes=None,
        rpn_anchor_generator=_anchors(card, 5),
        box_roi_pool=MultiScaleRoIAlign(levels, output_size=7, sampling_ratio=card.roi_sampling_ratio),
        box_head=TwoMLPHead(fpn_channels * 7 * 7, 256),
        box_predictor=FastRCNNPredictor(256, card.num_classes),
        mask_roi_pool=MultiScaleRoIAlign(levels, output_size=14, sampling_ratio=card.roi_sampling_ratio),
        mask_head=MaskRCNNHeads(fpn_channels, [64, 64, 64], dilation=1),
        mask_predictor=MaskRCNNPredictor(64, 64, card.num_classes),
        **_detection_kwargs(card),
    )
    model.transform = _native_transform(card)
    return model


BUILDERS: dict[str, Callable[[ModelCard], MaskRCNN]] = {
    "maskrcnn_resnet50_fpn": lambda card: _resnet50(card, tv_mask_rcnn.maskrcnn_resnet50_fpn),
    "maskrcnn_resnet50_fpn_v2": lambda card: _resnet50(card, tv_mask_rcnn.maskrcnn_resnet50_fpn_v2),
    "maskrcnn_mobilenet_v3_large_fpn": _mobilenet_v3_large,
    "maskrcnn_compact": _compact,
}


def build_model(card: ModelCard) -> MaskRCNN:
    """An untrained Mask R-CNN with the card's architecture, classes and thresholds."""
    if card.input.channels != 3:
        raise ValueError(f"{card.name}: torchvision Mask R-CNN backbones take 3 channels, card says {card.input.channels}")
    return BUILDERS[card.architecture](card)
