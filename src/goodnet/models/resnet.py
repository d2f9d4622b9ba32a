"""ResNet-20 in its CIFAR layout (He et al., "Deep Residual Learning", CVPR 2016, section 4.2).

Three stages of three basic blocks with 16, 32 and 64 channels, global average pooling and one
linear layer: 0.27 M parameters, which trains in minutes on a CPU. Shortcuts that change shape
are 1×1 convolutions with BatchNorm (the paper's option B; its CIFAR experiments used option A,
zero-padding, which has no weights to prune). Layers are named ``layer3.2.bn2`` and so on; every
ReLU is its own module, so activations after the residual sum can be observed (``relu2``).
"""

from __future__ import annotations

import torch
from torch import nn

from goodnet.models.spec import ModelSpec, Normalize


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with BatchNorm and an identity (or 1×1 projection) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet20(nn.Module):
    """ResNet-20 (3 stages × 3 blocks, 16/32/64 channels)."""

    layer1: nn.Sequential  # the stages, registered by name in __init__
    layer2: nn.Sequential
    layer3: nn.Sequential

    def __init__(self, spec: ModelSpec, blocks_per_stage: int = 3) -> None:
        super().__init__()
        self.normalize = Normalize(spec)
        self.conv1 = nn.Conv2d(spec.in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu1 = nn.ReLU()
        in_planes = 16
        for stage, planes in enumerate((16, 32, 64), start=1):
            blocks = []
            for i in range(blocks_per_stage):
                stride = 2 if stage > 1 and i == 0 else 1
                blocks.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            self.add_module(f"layer{stage}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(self.normalize(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))
