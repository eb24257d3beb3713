"""Architectures: the layer sizes of the DRMI paper's Table 1 (C3F2) and Table 2 (DNN5),
LeNet-5's classic sizes, ResNet-18 on 32x32 inputs, and lookup by name."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

from mlcore.architectures import ARCHITECTURES, build_model, layer_output_shapes


class Layers(NamedTuple):
    arch: str
    input_shape: tuple[int, int, int]
    expected: list[tuple[str, tuple[int, ...]]]


LAYERS = [
    # DRMI paper, Table 1: Parameters of the C3F2 model
    Layers("c3f2", (1, 28, 28), [
        ("Conv2d", (16, 24, 24)),
        ("Conv2d", (32, 20, 20)),
        ("MaxPool2d", (32, 10, 10)),
        ("Conv2d", (64, 6, 6)),
        ("MaxPool2d", (64, 3, 3)),
        ("Linear", (100,)),
        ("Linear", (10,)),
    ]),
    # DRMI paper, Table 2: Parameters of the DNN5 model (input 784)
    Layers("dnn5", (1, 28, 28), [
        ("Linear", (512,)),
        ("Linear", (256,)),
        ("Linear", (128,)),
        ("Linear", (64,)),
        ("Linear", (10,)),
    ]),
    # LeNet-5: 2 convolutions, 2 max-pools, 3 fully connected layers
    Layers("lenet5", (1, 28, 28), [
        ("Conv2d", (6, 28, 28)),
        ("MaxPool2d", (6, 14, 14)),
        ("Conv2d", (16, 10, 10)),
        ("MaxPool2d", (16, 5, 5)),
        ("Linear", (120,)),
        ("Linear", (84,)),
        ("Linear", (10,)),
    ]),
    # DC ConvNet (Zhao et al. 2021): 3 x [conv 128, instance norm, ReLU, avg-pool]; 28x28
    # padded by 3 at the first conv (the authors' code), so pooled from 32x32
    Layers("convnet", (1, 28, 28), [
        ("Conv2d", (128, 32, 32)),
        ("AvgPool2d", (128, 16, 16)),
        ("Conv2d", (128, 16, 16)),
        ("AvgPool2d", (128, 8, 8)),
        ("Conv2d", (128, 8, 8)),
        ("AvgPool2d", (128, 4, 4)),
        ("Linear", (10,)),
    ]),
]  # fmt: skip


@pytest.mark.parametrize("case", LAYERS, ids=[case.arch for case in LAYERS])
def test_layer_output_sizes_match_the_papers(case: Layers) -> None:
    assert layer_output_shapes(build_model(case.arch), case.input_shape) == case.expected


def test_lenet5_has_the_classic_parameter_count() -> None:
    # conv 156 + conv 2,416 + fc 48,120 + fc 10,164 + fc 850
    assert sum(p.numel() for p in build_model("lenet5").parameters()) == 61_706


def test_resnet18_keeps_32x32_resolution_in_its_stem() -> None:
    shapes = layer_output_shapes(build_model("resnet18"), (3, 32, 32))
    convs = [shape for kind, shape in shapes if kind == "Conv2d"]
    assert shapes[0] == ("Conv2d", (64, 32, 32))  # 3x3 stride-1 stem
    assert "MaxPool2d" not in {kind for kind, _ in shapes}  # no stem max-pool
    assert len(convs) == 20  # stem + 16 in the basic blocks + 3 downsampling shortcuts
    assert (512, 4, 4) in convs
    assert shapes[-1] == ("Linear", (10,))


@pytest.mark.parametrize(
    ("arch", "kwargs", "input_shape"),
    [
        ("lenet5", {}, (1, 28, 28)),
        ("c3f2", {}, (1, 28, 28)),
        ("dnn5", {}, (1, 28, 28)),
        ("resnet18", {}, (3, 32, 32)),
        ("lenet5", {"in_channels": 3, "num_classes": 7}, (3, 28, 28)),
        ("c3f2", {"num_classes": 4}, (1, 28, 28)),
        ("dnn5", {"in_channels": 3, "image_size": 32, "num_classes": 5}, (3, 32, 32)),
        ("resnet18", {"in_channels": 1, "num_classes": 3}, (1, 32, 32)),
        ("convnet", {}, (1, 28, 28)),
        ("convnet", {"in_channels": 3, "image_size": 32, "num_classes": 4}, (3, 32, 32)),
    ],
    ids=[
        "lenet5",
        "c3f2",
        "dnn5",
        "resnet18",
        "lenet5-rgb-7",
        "c3f2-4",
        "dnn5-rgb32-5",
        "resnet18-grey-3",
        "convnet",
        "convnet-rgb32-4",
    ],
)
def test_models_return_one_logit_per_class(
    arch: str, kwargs: dict[str, int], input_shape: tuple[int, ...]
) -> None:
    torch.manual_seed(0)
    model = build_model(arch, **kwargs).eval()
    with torch.no_grad():
        logits = model(torch.rand(5, *input_shape))
    assert logits.shape == (5, kwargs.get("num_classes", 10))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert not torch.allclose(logits[0], logits[1])  # depends on the input


def test_build_model_is_seeded_by_torch() -> None:
    torch.manual_seed(3)
    first = build_model("c3f2").state_dict()
    torch.manual_seed(3)
    second = build_model("c3f2").state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_unknown_architecture_names_the_value_and_the_choices() -> None:
    with pytest.raises(
        ValueError,
        match=r"one of \['c3f2', 'convnet', 'dnn5', 'lenet5', 'resnet18'\], got 'vgg'",
    ):
        build_model("vgg")
    assert set(ARCHITECTURES) == {"lenet5", "c3f2", "dnn5", "resnet18", "convnet"}


def test_convnet_uses_instance_norm_and_average_pooling() -> None:
    model = build_model("convnet")
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 3 and all(m.num_groups == m.num_channels == 128 for m in norms)
    assert not any(
        isinstance(m, torch.nn.MaxPool2d | torch.nn.BatchNorm2d) for m in model.modules()
    )
