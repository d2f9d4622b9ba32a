"""PreAct-ResNet-18 (He et al., "Identity Mappings in Deep Residual Networks", ECCV 2016).

The network of the backdoor benchmarks (BackdoorBench, and the RNP and ANP papers' CIFAR-10
experiments), laid out as in their shared reference implementation (Kuang Liu's
``pytorch-cifar``): a 3×3 stem with 64 channels, four stages of two pre-activation blocks
(64/128/256/512), global average pooling and one linear layer, 11 M parameters. Meant for users
with bigger machines; on a laptop CPU prefer ``resnet20``.
"""

from __future__ import annotations

import torch
from torch import nn

from goodnet.models.spec import ModelSpec, Normalize


class PreActBlock(nn.Module):
    """BN → ReLU → conv, twice, with the shortcut taken after the first pre-activation."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.relu2(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    """PreAct-ResNet-18 (2-2-2-2 blocks, 64/128/256/512 channels)."""

    layer1: nn.Sequential  # the stages, registered by name in __init__
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.normalize = Normalize(spec)
        self.conv1 = nn.Conv2d(spec.in_channels, 64, 3, padding=1, bias=False)
        in_planes = 64
        for stage, (planes, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), 1):
            blocks = [PreActBlock(in_planes, planes, stride), PreActBlock(planes, planes, 1)]
            in_planes = planes
            self.add_module(f"layer{stage}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(512, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(self.normalize(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.linear(self.flatten(self.avgpool(x)))
