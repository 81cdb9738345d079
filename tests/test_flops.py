"""The work per image (contract) against PyTorch's own FLOP counter, and the machine's matmul yardstick.

PyTorch runs in a subprocess: the pytest process imports no framework.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.yardstick import BUDGET_S, MAX_PRODUCTS, MIN_PRODUCTS, measure_matmul_rate
from implementations import contract
from commands import REPO

# Forward and backward of a cross-entropy loss on 2 MNIST images (training-mode BatchNorm needs more than one value per
# channel: layer4's maps are 1x1), once as training runs it and once with the images requiring a gradient. Then, for
# each convolution, the multiply-adds that read the image rather than padding, counted by the convolution itself: an
# all-ones kernel over an all-ones map of the layer's input size sums, at each output, the taps that land inside.
COUNT_FLOPS = """
import json, sys
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from bench.data import load_mnist
from implementations import contract
from implementations.pytorch.trainer import ResNet18

mnist = load_mnist(sys.argv[1])
images = torch.from_numpy(contract.normalize(mnist.train_images[:2]))
labels = torch.from_numpy(mnist.train_labels[:2].astype("int64"))
model = ResNet18()
counts = {}
for input_gradient in (False, True):
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(images.clone().requires_grad_(input_gradient)), labels).backward()
    counts[f"input_gradient={input_gradient}"] = counter.get_total_flops() / len(images)

inside = {}
def count_inside(name, conv):
    def hook(module, inputs, output):
        ones = torch.ones(1, 1, *inputs[0].shape[2:])
        taps = F.conv2d(ones, torch.ones(1, 1, *conv.kernel_size), stride=conv.stride, padding=conv.padding).sum()
        inside[f"{name}.weight"] = int(taps) * conv.in_channels * conv.out_channels
    return hook
for name, module in model.named_modules():
    if isinstance(module, torch.nn.Conv2d):
        module.register_forward_hook(count_inside(name, module))
with torch.no_grad():
    model(images)
counts["inside_image"] = inside
print(json.dumps(counts))
"""


@pytest.fixture(scope="module")
def pytorch_counts(mnist_dir) -> dict:
    """FlopCounterMode's FLOPs per image, with and without the images' gradient, and each convolution's multiply-adds
    that read the image."""
    result = subprocess.run([sys.executable, "-c", COUNT_FLOPS, mnist_dir], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_training_flops_equal_pytorchs_count(pytorch_counts):
    # Both count every convolution and linear product by the direct method, 2 FLOPs per multiply-add, and nothing else.
    assert pytorch_counts["input_gradient=False"] == contract.training_flops_per_image()


def test_pytorch_counts_the_stem_input_gradient_only_when_images_require_one(pytorch_counts):
    stem = 2 * contract.forward_multiply_adds()["conv1.weight"]
    assert pytorch_counts["input_gradient=True"] - pytorch_counts["input_gradient=False"] == stem


def test_multiply_adds_inside_the_image_equal_those_a_convolution_finds(pytorch_counts):
    convolutions = {name: count for name, count in contract.forward_multiply_adds(include_padding=False).items()
                    if name != "fc.weight"}
    assert convolutions == pytorch_counts["inside_image"]


def test_every_weighted_layer_is_counted():
    weighted = {name for name, shape in contract.canonical_shapes().items() if len(shape) in (2, 4)}
    assert set(contract.forward_multiply_adds()) == weighted


def test_cpu_matmul_rate_is_plausible_and_stays_within_its_budget():
    """Every session times it: it stops after BUDGET_S of products (the last may end past it), judged by its own
    product times rather than the clock of a machine that may be busy."""
    rate = measure_matmul_rate("cpu", "fp32")
    assert 1e9 < rate.flops_per_second < 1e14, rate  # any CPU today: above a GFLOP/s, below 100 TFLOP/s
    assert rate.median_flops_per_second <= rate.flops_per_second and rate.threads >= 1, rate
    product_s = 2 * rate.size**3 / rate.median_flops_per_second
    assert MIN_PRODUCTS <= rate.products <= MAX_PRODUCTS, rate
    assert rate.products == MIN_PRODUCTS or (rate.products - 1) * product_s <= 2 * BUDGET_S, rate
