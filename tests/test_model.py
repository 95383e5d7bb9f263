"""The three AlexNet variants: structure, parameter counts, initialisation, shapes, gradients."""

import pytest
import torch
from torch import nn

from train.lrn import PaperLRN
from train.model import ARCHS, build_model, min_input_size


@pytest.fixture(scope="module")
def models():
    """arch -> a 10-class model, built once per module (building one costs about a second)."""
    cache = {}

    def get(arch):
        if arch not in cache:
            torch.manual_seed(0)
            cache[arch] = build_model(arch, num_classes=10)
        return cache[arch]

    return get


@pytest.fixture
def paper(models):
    return models("alexnet")


@pytest.fixture
def paper_bn(models):
    return models("alexnet-bn")


def param_count(arch, num_classes):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        return sum(p.numel() for p in build_model(arch, num_classes).parameters())


@pytest.mark.parametrize(
    "arch, num_classes, expected",
    [
        ("alexnet", 1000, 60_965_224),  # the paper's count
        ("alexnet", 10, 60_965_224 - 4096 * 990 - 990),
        ("alexnet-tv", 1000, 61_100_840),
        ("alexnet-tv", 10, 57_044_810),
        # conv biases (96 + 256 + 384 + 384 + 256 = 1376) replaced by BatchNorm's weight and bias
        ("alexnet-bn", 1000, 60_965_224 - 1376 + 2 * 1376),
    ],
)
def test_parameter_count(arch, num_classes, expected):
    assert param_count(arch, num_classes) == expected


def test_unknown_arch():
    with pytest.raises(ValueError, match="unknown arch 'vgg'; choose one of alexnet, alexnet-tv, alexnet-bn"):
        build_model("vgg")
    assert ARCHS == ("alexnet", "alexnet-tv", "alexnet-bn")


def test_paper_layer_order(paper):
    assert list(paper.features._modules) == [
        "conv1", "relu1", "lrn1", "pool1",
        "conv2", "relu2", "lrn2", "pool2",
        "conv3", "relu3",
        "conv4", "relu4",
        "conv5", "relu5", "pool5",
    ]  # fmt: skip
    assert list(paper.classifier._modules) == ["fc6", "relu6", "drop6", "fc7", "relu7", "drop7", "fc8"]
    assert isinstance(paper.avgpool, nn.AdaptiveAvgPool2d) and paper.avgpool.output_size == 6


def test_paper_convs(paper):
    convs = [m for m in paper.features if isinstance(m, nn.Conv2d)]
    got = [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.groups) for c in convs]
    assert got == [
        (3, 96, (11, 11), (4, 4), (2, 2), 1),
        (96, 256, (5, 5), (1, 1), (2, 2), 2),
        (256, 384, (3, 3), (1, 1), (1, 1), 1),
        (384, 384, (3, 3), (1, 1), (1, 1), 2),
        (384, 256, (3, 3), (1, 1), (1, 1), 2),
    ]
    pools = [m for m in paper.features if isinstance(m, nn.MaxPool2d)]
    assert [(p.kernel_size, p.stride) for p in pools] == [(3, 2)] * 3
    fcs = [paper.classifier.fc6, paper.classifier.fc7, paper.classifier.fc8]
    assert [(f.in_features, f.out_features) for f in fcs] == [(9216, 4096), (4096, 4096), (4096, 10)]
    assert [m.p for m in paper.classifier if isinstance(m, nn.Dropout)] == [0.5, 0.5]


def test_paper_lrn_is_the_papers(paper):
    # The paper's k=2, n=5, alpha=1e-4, beta=0.75 is PyTorch's LocalResponseNorm with alpha * n.
    lrns = [m for m in paper.features if isinstance(m, PaperLRN)]
    assert len(lrns) == 2
    x = torch.randn(2, 96, 7, 7, generator=torch.Generator().manual_seed(1)) * 30
    reference = nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)(x)
    for lrn in lrns:
        torch.testing.assert_close(lrn(x), reference, rtol=1e-5, atol=1e-6)


def test_paper_init(paper):
    ones = {"conv2", "conv4", "conv5", "fc6", "fc7"}
    layers = {**dict(paper.features.named_children()), **dict(paper.classifier.named_children())}
    for name, m in layers.items():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        assert torch.equal(m.bias, torch.full_like(m.bias, 1.0 if name in ones else 0.0)), name
        w = m.weight.detach().double()
        # the smallest layer (conv1, 34,848 weights) estimates its std to about 0.4%
        assert abs(w.std().item() - 0.01) < 3e-4, name
        assert abs(w.mean().item()) < 3e-4, name


def test_bn_structure_and_init(paper_bn):
    names = list(paper_bn.features._modules)
    assert names == [
        "conv1", "bn1", "relu1", "pool1",
        "conv2", "bn2", "relu2", "pool2",
        "conv3", "bn3", "relu3",
        "conv4", "bn4", "relu4",
        "conv5", "bn5", "relu5", "pool5",
    ]  # fmt: skip
    assert not any(isinstance(m, PaperLRN) for m in paper_bn.modules())
    convs = [m for m in paper_bn.features if isinstance(m, nn.Conv2d)]
    assert [c.groups for c in convs] == [1, 2, 1, 2, 2]
    for conv, bn in zip(convs, [m for m in paper_bn.features if isinstance(m, nn.BatchNorm2d)]):
        assert conv.bias is None and bn.num_features == conv.out_channels
        assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(bn.bias, torch.zeros_like(bn.bias))
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        assert abs(conv.weight.std().item() / (2 / fan_out) ** 0.5 - 1) < 0.03
    for fc in (paper_bn.classifier.fc6, paper_bn.classifier.fc7, paper_bn.classifier.fc8):
        assert torch.equal(fc.bias, torch.zeros_like(fc.bias))
        assert abs(fc.weight.std().item() - 0.01) < 3e-4


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("size, feature_side", [(224, 6), (256, 7)])
def test_output_shapes(models, arch, size, feature_side):
    model = models(arch).eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        # 224 gives exactly 6 x 6 before the adaptive pool (a no-op there); larger crops give more
        assert model.features(x).shape == (2, 256, feature_side, feature_side)
        assert model(x).shape == (2, 10)


@pytest.mark.parametrize("arch", ARCHS)
def test_min_input_size_is_the_smallest_side_each_arch_takes(models, arch):
    """The meta-device probe agrees with real tensors: 63 x 63 goes through (a 1 x 1 map before the
    adaptive pool), 62 x 62 leaves a max-pool larger than its input."""
    model = models(arch).eval()
    assert min_input_size(arch) == 63
    with torch.no_grad():
        assert model.features(torch.zeros(2, 3, 63, 63)).shape == (2, 256, 1, 1)
        with pytest.raises(RuntimeError, match="Output size is too small"):
            model(torch.zeros(2, 3, 62, 62))


@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_reach_every_parameter(models, arch):
    model = models(arch).train()
    model.zero_grad(set_to_none=True)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    nn.functional.cross_entropy(model(x), torch.tensor([0, 1])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_dropout_only_in_training(paper):
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        paper.eval()
        assert torch.equal(paper(x), paper(x))
        paper.train()
        assert not torch.equal(paper(x), paper(x))
        paper.eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_channels_last_matches(models, arch):
    model = models(arch).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = model(x)
        got = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
        model.to(memory_format=torch.contiguous_format)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_channels_last_bf16(arch):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=10).cuda().to(memory_format=torch.channels_last).train()
    x = torch.randn(8, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(x)
    assert logits.shape == (8, 10) and logits.dtype == torch.bfloat16
    nn.functional.cross_entropy(logits.float(), torch.arange(8, device="cuda") % 10).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_autocast_on_cpu(models, arch):
    model = models(arch).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(x.contiguous(memory_format=torch.channels_last))
    assert got.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa: the logits agree to about 1% of their spread
    assert (got.float() - expected).abs().max() < 0.02 * expected.abs().max() + 1e-3
