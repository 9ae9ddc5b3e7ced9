"""LeNet-5 (LeCun et al., 1998) as commonly built today."""

import torch
import torch.nn.functional as F

from .. import nn


class LeNet5(torch.nn.Module):
    """C1 conv 1→6 5×5 (padding 2, for 28×28 MNIST digits), S2 max-pool 2,
    C3 conv 6→16 5×5, S4 max-pool 2, then C5/F6/output as fc 400→120→84→10,
    ReLU between; on pyconvext's modules, or torch.nn's with native=True. (The
    paper's subsampling was a trained average and its C3 was sparsely wired;
    this is the usual modern rendering.)"""

    def __init__(self, num_classes=10, native=False):
        super().__init__()
        modules = torch.nn if native else nn
        self.c1 = modules.Conv2d(1, 6, kernel_size=5, padding=2)
        self.c3 = modules.Conv2d(6, 16, kernel_size=5)
        self.pool = modules.MaxPool2d(2)
        self.f5 = torch.nn.Linear(16 * 5 * 5, 120)
        self.f6 = torch.nn.Linear(120, 84)
        self.output = torch.nn.Linear(84, num_classes)

    def forward(self, x):
        x = self.pool(F.relu(self.c1(x)))
        x = self.pool(F.relu(self.c3(x)))
        x = F.relu(self.f5(x.flatten(1)))
        x = F.relu(self.f6(x))
        return self.output(x)
