"""ZFNet (Zeiler and Fergus, 2013), the 2013 ImageNet winner."""

import torch

from .. import nn


class ZFNet(torch.nn.Module):
    """AlexNet with a 7×7 stride-2 first layer and a stride-2 second layer:
    224×224 → conv 96 7×7/2 → pool 3/2 → conv 256 5×5/2 → pool 3/2 →
    conv 384, 384, 256 3×3 → pool 3/2 → 256×6×6 → fc 4096, 4096, classes,
    with dropout before the first two fc layers; on pyconvext's modules, or
    torch.nn's with native=True. As torchvision's AlexNet, it leaves out the
    paper's local contrast normalization and adds an adaptive average pool so
    that smaller inputs work."""

    def __init__(self, num_classes=1000, dropout=0.5, native=False):
        super().__init__()
        modules = torch.nn if native else nn
        relu = torch.nn.ReLU
        self.features = torch.nn.Sequential(
            modules.Conv2d(3, 96, kernel_size=7, stride=2, padding=1), relu(inplace=True),
            modules.MaxPool2d(3, stride=2, padding=1),
            modules.Conv2d(96, 256, kernel_size=5, stride=2), relu(inplace=True),
            modules.MaxPool2d(3, stride=2, padding=1),
            modules.Conv2d(256, 384, kernel_size=3, padding=1), relu(inplace=True),
            modules.Conv2d(384, 384, kernel_size=3, padding=1), relu(inplace=True),
            modules.Conv2d(384, 256, kernel_size=3, padding=1), relu(inplace=True),
            modules.MaxPool2d(3, stride=2),
        )
        self.avgpool = torch.nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = torch.nn.Sequential(
            torch.nn.Dropout(dropout), torch.nn.Linear(256 * 6 * 6, 4096), relu(inplace=True),
            torch.nn.Dropout(dropout), torch.nn.Linear(4096, 4096), relu(inplace=True),
            torch.nn.Linear(4096, num_classes),
        )

    def forward(self, x):
        x = self.avgpool(self.features(x))
        return self.classifier(x.flatten(1))
