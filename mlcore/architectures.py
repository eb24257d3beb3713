"""The classifiers the range hosts and steals, looked up by name.

LeNet-5, C3F2 (DRMI paper Table 1) and DNN5 (Table 2) take 1x28x28 images; ResNet-18 is
torchvision's, adapted to 32x32 inputs (3x3 stem, no max-pool) as is usual for CIFAR-10; the
ConvNet is the one dataset condensation (DC, DM) matches and evaluates with.
All models take float inputs in [0, 1] and return logits.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import nn
from torchvision.models import resnet18


def lenet5(*, in_channels: int = 1, num_classes: int = 10) -> nn.Sequential:
    """LeNet-5 with max-pooling and ReLU (the DRMI paper's setting): 2 conv, 2 pool, 3 FC."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 6, kernel_size=5, padding=2),  # 6x28x28
        nn.ReLU(),
        nn.MaxPool2d(2),  # 6x14x14
        nn.Conv2d(6, 16, kernel_size=5),  # 16x10x10
        nn.ReLU(),
        nn.MaxPool2d(2),  # 16x5x5
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, num_classes),
    )


def c3f2(*, in_channels: int = 1, num_classes: int = 10) -> nn.Sequential:
    """C3F2, DRMI paper Table 1: three 5x5 convolutions, two max-pools, two FC layers."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, kernel_size=5),  # 16x24x24
        nn.ReLU(),
        nn.Conv2d(16, 32, kernel_size=5),  # 32x20x20
        nn.ReLU(),
        nn.MaxPool2d(2),  # 32x10x10
        nn.Conv2d(32, 64, kernel_size=5),  # 64x6x6
        nn.ReLU(),
        nn.MaxPool2d(2),  # 64x3x3
        nn.Flatten(),
        nn.Linear(64 * 3 * 3, 100),
        nn.ReLU(),
        nn.Linear(100, num_classes),
    )


def dnn5(*, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> nn.Sequential:
    """DNN5, DRMI paper Table 2: five fully connected layers 512-256-128-64-classes."""
    widths = [in_channels * image_size * image_size, 512, 256, 128, 64]
    layers: list[nn.Module] = [nn.Flatten()]
    for width_in, width_out in itertools.pairwise(widths):
        layers += [nn.Linear(width_in, width_out), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], num_classes))
    return nn.Sequential(*layers)


def resnet18_small(*, in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    """torchvision ResNet-18 with a 3x3 stride-1 stem and no max-pool, for 32x32 images."""
    model = resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def convnet(
    *,
    in_channels: int = 1,
    num_classes: int = 10,
    image_size: int = 28,
    width: int = 128,
    depth: int = 3,
) -> nn.Sequential:
    """The dataset-condensation ConvNet (Zhao, Mopuri and Bilen, ICLR 2021, as the authors coded
    it): ``depth`` blocks of 3x3 conv (``width`` channels), instance norm (a GroupNorm with one
    group per channel, affine), ReLU and 2x2 average pooling, then one linear layer. A 28x28
    image gets a first padding of 3 (so it is pooled from 32x32), as in the authors' code.
    Everything but the last layer is the embedding distribution matching compares."""
    layers: list[nn.Module] = []
    channels, side = in_channels, image_size
    for block in range(depth):
        padding = 3 if block == 0 and image_size == 28 else 1
        layers += [
            nn.Conv2d(channels, width, kernel_size=3, padding=padding),
            nn.GroupNorm(width, width, affine=True),
            nn.ReLU(),
            nn.AvgPool2d(2),
        ]
        channels, side = width, (side + 2 * padding - 2) // 2
    layers += [nn.Flatten(), nn.Linear(width * side * side, num_classes)]
    return nn.Sequential(*layers)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "lenet5": lenet5,
    "c3f2": c3f2,
    "dnn5": dnn5,
    "resnet18": resnet18_small,
    "convnet": convnet,
}


def build_model(arch: str, **arch_kwargs: int) -> nn.Module:
    """Build an untrained model by architecture name (see ARCHITECTURES)."""
    try:
        factory = ARCHITECTURES[arch]
    except KeyError:
        raise ValueError(f"arch must be one of {sorted(ARCHITECTURES)}, got {arch!r}") from None
    return factory(**arch_kwargs)


def arch_kwargs_for(
    arch: str, input_shape: tuple[int, int, int], num_classes: int
) -> dict[str, int]:
    """The keyword arguments that build ``arch`` for ``input_shape`` (C, H, W) images."""
    channels, height, width = input_shape
    kwargs = {"in_channels": channels, "num_classes": num_classes}
    if arch in ("dnn5", "convnet"):
        if height != width:
            raise ValueError(f"{arch} needs square images, got {height}x{width}")
        kwargs["image_size"] = height
    return kwargs


@torch.no_grad()
def check_input_shape(arch: str, input_shape: tuple[int, int, int], num_classes: int) -> None:
    """Raise ValueError unless ``arch`` accepts images of ``input_shape`` (C, H, W): one forward
    pass of two blank images, so the rule is the architecture itself, not a copy of it."""
    model = build_model(arch, **arch_kwargs_for(arch, input_shape, num_classes))
    try:
        out = model.eval()(torch.zeros(2, *input_shape))
    except RuntimeError as exc:
        raise ValueError(
            f"{arch} does not accept images of shape {list(input_shape)}: {str(exc)[:200]}"
        ) from None
    if tuple(out.shape) != (2, num_classes):
        raise ValueError(f"{arch} gives output {list(out.shape)} for {list(input_shape)} images")


def accepting_architectures(input_shape: tuple[int, int, int], num_classes: int) -> list[str]:
    """The architectures that accept images of ``input_shape``."""
    accepted = []
    for arch in ARCHITECTURES:
        try:
            check_input_shape(arch, input_shape, num_classes)
        except ValueError:
            continue
        accepted.append(arch)
    return accepted


@torch.no_grad()
def layer_output_shapes(model: nn.Module, input_shape: tuple[int, ...]) -> list[tuple[str, tuple]]:
    """(layer type, output shape without batch) for every conv, pool and linear layer, in order."""
    shapes: list[tuple[str, tuple]] = []
    kinds = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.Linear)
    hooks = [
        module.register_forward_hook(
            lambda mod, _inp, out: shapes.append((type(mod).__name__, tuple(out.shape[1:])))
        )
        for module in model.modules()
        if isinstance(module, kinds)
    ]
    try:
        model.eval()(torch.zeros(1, *input_shape))
    finally:
        for hook in hooks:
            hook.remove()
    return shapes
