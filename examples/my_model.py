"""Your own network, as a notebook defines it, trained without editing the package:

    python train.py --model examples/my_model.py:build --model_args '{"width": 32}'
    python train.py --model examples/my_model.py:resnet18_notebook --weights resnet18.pth

The function is called with ``num_classes`` (8 with --multi_head: mask 3, gender 2, age 3 logits
side by side) and the keyword arguments of --model_args, and returns an nn.Module that maps
normalised [B, 3, H, W] images to [B, num_classes] logits. The run records this file (its path
and sha256) and the arguments: inference rebuilds the network by the same import and loads the
checkpoint's weights into it (weights_only), and refuses if the file has changed since.
"""
import torchvision
from torch import nn


def build(num_classes: int, width: int = 32) -> nn.Module:
    """A small CNN: three stride-2 conv blocks, global pooling, one linear layer."""
    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU(inplace=True))
    return nn.Sequential(block(3, width), block(width, 2 * width), block(2 * width, 4 * width),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, num_classes))


def resnet18_notebook(num_classes: int) -> nn.Module:
    """The usual notebook habit: torchvision's resnet18 with a new fc layer (its ImageNet weights
    come from --weights FILE: nothing is downloaded)."""
    net = torchvision.models.resnet18(weights=None)
    net.fc = nn.Linear(net.fc.in_features, num_classes)
    return net
