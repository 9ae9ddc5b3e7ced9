"""The MNIST net of the classic PyTorch MNIST example."""

import torch
import torch.nn.functional as F

from .. import nn


class MNISTNet(torch.nn.Module):
    """conv 1→10 5×5, max-pool 2, ReLU, conv 10→20 5×5, Dropout2d, max-pool 2,
    ReLU, fc 320→50, ReLU, dropout, fc 50→10, log_softmax; on pyconvext's
    Conv2d and MaxPool2d, or on torch.nn's with native=True. The parameter
    names are the example's, so its checkpoints load either way."""

    def __init__(self, native=False):
        super().__init__()
        modules = torch.nn if native else nn
        self.conv1 = modules.Conv2d(1, 10, kernel_size=5)
        self.conv2 = modules.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = torch.nn.Dropout2d()
        self.pool = modules.MaxPool2d(2)
        self.fc1 = torch.nn.Linear(320, 50)
        self.fc2 = torch.nn.Linear(50, 10)

    def forward(self, x):
        x = F.relu(self.pool(self.conv1(x)))
        x = F.relu(self.pool(self.conv2_drop(self.conv2(x))))
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = F.dropout(x, training=self.training)
        return F.log_softmax(self.fc2(x), dim=1)
