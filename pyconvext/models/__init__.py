"""Architectures torchvision lacks, built from pyconvext's modules (or native
ones with native=True, for comparison). AlexNet, VGG, GoogLeNet and ResNet come
from torchvision: pyconvext.convert(torchvision.models.resnet18())."""

from .lenet import LeNet5
from .mnist import MNISTNet
from .zfnet import ZFNet

__all__ = ["LeNet5", "MNISTNet", "ZFNet"]
