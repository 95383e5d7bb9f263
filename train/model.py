"""AlexNet variants for alextrain, picked by name with `build_model(arch, num_classes)`.

- "alexnet":    Krizhevsky, Sutskever & Hinton (2012) as published: 96-256-384-384-256 convolutions with
                the paper's two-tower connectivity as groups=2, LRN after the first two ReLUs,
                overlapping 3/2 max-pooling, dropout 0.5, the paper's initialisation. 60,965,224
                parameters at 1000 classes.
- "alexnet-tv": torchvision's single-tower "one weird trick" variant (64-192-384-256-256, no LRN), with
                torchvision's own initialisation. 61,100,840 parameters at 1000 classes.
- "alexnet-bn": the paper's layout with BatchNorm2d between every convolution and its ReLU instead of
                LRN; modern initialisation. The groups are kept, so that BatchNorm (with its init) is
                the only change against "alexnet". 60,966,600 parameters at 1000 classes.

Every variant ends in AdaptiveAvgPool2d(6): a no-op for 224 x 224 inputs (the feature map is already
6 x 6), and it lets larger crops (e.g. the full 256 x 256 image) through the same classifier.
Nothing here depends on memory format or dtype, so channels_last and bf16 autocast work unchanged.
"""

import functools
import itertools
from collections import OrderedDict

import torch
import torchvision
from torch import nn

from train.lrn import PaperLRN

ARCHS = ("alexnet", "alexnet-tv", "alexnet-bn")

# How each architecture's recipe feeds it pixels (train/augment.py: INPUT_SCALINGS; why: docs/recipe.md).
# The paper's N(0, 0.01) init is sized for its inputs, 0-255 values minus the mean; the other two
# were made for unit-variance inputs. Checkpoints record the scaling a model was trained with.
INPUTS = {"alexnet": "subtract-mean", "alexnet-tv": "standardize", "alexnet-bn": "standardize"}
# Linear learning-rate warm-up in steps when --warmup-epochs is not given (docs/recipe.md: the paper's
# bias-1 fc layers make the first steps unstable on sets of few classes); none for the others.
WARMUP_STEPS = {"alexnet": 150}

# (in_channels, out_channels, kernel, stride, padding, groups, LRN after the ReLU, max-pool after)
# for conv1..conv5. groups=2 is the paper's split over two GPUs: conv2, conv4 and conv5 see only the
# kernel maps of their own GPU, conv3 sees all of them. The paper states 224 x 224 inputs give 55 x 55
# conv1 maps, which needs 2 pixels of padding ((224 + 4 - 11) // 4 + 1 = 55).
_CONVS = (
    (3, 96, 11, 4, 2, 1, True, True),
    (96, 256, 5, 1, 2, 2, True, True),
    (256, 384, 3, 1, 1, 1, False, False),
    (384, 384, 3, 1, 1, 2, False, False),
    (384, 256, 3, 1, 1, 2, False, True),
)
# The paper's init: every weight N(0, 0.01); biases 1 in these layers (to give the ReLUs positive
# inputs early on), 0 elsewhere.
_BIAS_ONE = ("conv2", "conv4", "conv5", "fc6", "fc7")


class AlexNet(nn.Module):
    """The paper's network. norm="lrn": the paper's LRN; norm="bn": BatchNorm after every conv, no LRN."""

    def __init__(self, num_classes: int = 1000, norm: str = "lrn"):
        super().__init__()
        if norm not in ("lrn", "bn"):
            raise ValueError(f"norm must be 'lrn' or 'bn', not {norm!r}")
        layers = OrderedDict()
        for i, (cin, cout, kernel, stride, padding, groups, lrn, pool) in enumerate(_CONVS, 1):
            # A conv bias in front of BatchNorm is cancelled by its mean subtraction, so it is dropped.
            layers[f"conv{i}"] = nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=norm == "lrn")
            if norm == "bn":
                layers[f"bn{i}"] = nn.BatchNorm2d(cout)
            layers[f"relu{i}"] = nn.ReLU(inplace=True)
            if lrn and norm == "lrn":
                layers[f"lrn{i}"] = PaperLRN(size=5, alpha=1e-4, beta=0.75, k=2.0)
            if pool:
                layers[f"pool{i}"] = nn.MaxPool2d(kernel_size=3, stride=2)
        self.features = nn.Sequential(layers)
        self.avgpool = nn.AdaptiveAvgPool2d(6)
        # Dropout order: the paper "sets to zero the output of each hidden neuron with probability 0.5"
        # and uses dropout "in the first two fully-connected layers", i.e. on the outputs of fc6 and
        # fc7, as Caffe's bvlc_alexnet does (drop6 after relu6, drop7 after relu7). torchvision instead
        # drops fc6's inputs (the pool5 features) and fc6's outputs, and never fc7's outputs.
        # Dropout after ReLU equals dropout before it (both only zero or scale by 2).
        self.classifier = nn.Sequential(
            OrderedDict(
                fc6=nn.Linear(256 * 6 * 6, 4096),
                relu6=nn.ReLU(inplace=True),
                drop6=nn.Dropout(0.5),
                fc7=nn.Linear(4096, 4096),
                relu7=nn.ReLU(inplace=True),
                drop7=nn.Dropout(0.5),
                fc8=nn.Linear(4096, num_classes),
            )
        )
        if norm == "lrn":
            self._init_paper()
        else:
            self._init_modern()

    def _init_paper(self) -> None:
        for name, m in self.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.constant_(m.bias, 1.0 if name.rsplit(".", 1)[-1] in _BIAS_ONE else 0.0)

    def _init_modern(self) -> None:
        # He init for the convs (as torchvision's ResNets: fan_out, ReLU gain); with BatchNorm behind
        # them their scale only sets the effective learning rate. The fc layers keep N(0, 0.01), which
        # is what torchvision's VGG uses too; no bias-1 trick is needed once activations are normalised.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images, H, W >= 224 -> (B, num_classes) logits."""
        x = self.avgpool(self.features(x))  # (B, 256, 6, 6)
        return self.classifier(torch.flatten(x, 1))  # (B, 9216) -> (B, num_classes)


def build_model(arch: str, num_classes: int = 1000) -> nn.Module:
    """A freshly initialised model of one of ARCHS; draws its weights from torch's global RNG."""
    if arch == "alexnet":
        return AlexNet(num_classes, norm="lrn")
    if arch == "alexnet-bn":
        return AlexNet(num_classes, norm="bn")
    if arch == "alexnet-tv":
        return torchvision.models.alexnet(weights=None, num_classes=num_classes)
    raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")


@functools.cache
def min_input_size(arch: str) -> int:
    """The smallest side of a square input that every layer of `arch` accepts (a smaller one leaves a
    kernel larger than its input), found by passing (1, 3, s, s) inputs through the model on the meta
    device: shapes only, no memory or arithmetic."""
    with torch.device("meta"):
        model = build_model(arch).eval()  # eval: BatchNorm takes a 1 x 1 map of one image

    def fits(side: int) -> bool:
        try:
            model(torch.empty(1, 3, side, side, device="meta"))
            return True
        except RuntimeError:  # "Output size is too small", "Kernel size can't be greater than actual input size"
            return False

    return next(side for side in itertools.count(1) if fits(side))
