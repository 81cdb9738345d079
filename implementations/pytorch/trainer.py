"""ResNet18 on MNIST in PyTorch: the reference implementation that every other framework is checked against.

A page of the Rosetta stone: the sections of contract.PAGE_SECTIONS, in order, and the names every page uses.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from implementations import contract


# --- Model -----------------------------------------------------------------------------------------------------------
def batchnorm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=contract.BN_EPSILON, momentum=contract.BN_MOMENTUM)


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = batchnorm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = batchnorm(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), batchnorm(out_channels))

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + shortcut)


class ResNet18(nn.Module):
    def __init__(self):
        super().__init__()
        widths = contract.STAGE_WIDTHS
        self.conv1 = nn.Conv2d(1, widths[0], 7, 2, padding=3, bias=False)
        self.bn1 = batchnorm(widths[0])
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        in_channels = widths[0]
        for stage, (width, blocks) in enumerate(zip(widths, contract.BLOCKS_PER_STAGE), start=1):
            stride = 1 if stage == 1 else 2
            layer = [BasicBlock(in_channels if b == 0 else width, width, stride if b == 0 else 1) for b in range(blocks)]
            setattr(self, f"layer{stage}", nn.Sequential(*layer))
            in_channels = width
        self.fc = nn.Linear(widths[-1], contract.NUM_CLASSES)

    def forward(self, x):  # [B, 1, 28, 28] -> [B, 10]
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# --- State -----------------------------------------------------------------------------------------------------------
def select_device(config: contract.RunConfig) -> torch.device:
    if config.device == "cuda" and not torch.cuda.is_available():
        raise contract.ConfigError("--device cuda: PyTorch sees no CUDA GPU (is this a CPU-only torch build?); use --device cpu")
    device = torch.device("cuda" if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()) else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = config.allow_tf32
    return device


def device_data(data: contract.Data, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The whole dataset on the device, images channels-last: an epoch only indexes it."""
    images = lambda array: torch.from_numpy(array).to(device).contiguous(memory_format=torch.channels_last)
    labels = lambda array: torch.from_numpy(array).to(device).long()
    return images(data.train_images), labels(data.train_labels), images(data.test_images), labels(data.test_labels)


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.SGD:
    # PyTorch's momentum formulation is the contract's; the schedule sets the rate (before each step, or via LambdaLR).
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=contract.SGD_MOMENTUM)


class TorchTrainer(contract.Trainer):

    def build(self, weights):
        self.device = select_device(self.config)
        torch.backends.cudnn.benchmark = True  # static shapes: pick the fastest convolution algorithms once
        # Channels-last (NHWC) convolutions are faster with oneDNN on CPU (620 vs 530 images/s here) and tensor cores.
        self.model = ResNet18().to(self.device, memory_format=torch.channels_last)
        self.network = torch.compile(self.model) if self.config.compile else self.model
        self.train_images, self.train_labels, self.test_images, self.test_labels = device_data(self.data, self.device)
        self.import_weights(weights)

    def environment(self):
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "CPU"
        return {"framework_version": torch.__version__, "device": name}

    def memory_peak_bytes(self):
        return torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None

    def autocast(self):
        if self.config.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # --- Train step --------------------------------------------------------------------------------------------------
    def set_learning_rate(self, step: int) -> float:
        for group in self.optimizer.param_groups:  # nanoGPT's way: the schedule sets the rate before each step
            group["lr"] = float(self.schedule[step])
        return self.optimizer.param_groups[0]["lr"]

    def device_train_step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.set_learning_rate(self.step)
        with self.autocast():
            loss = F.cross_entropy(self.network(images), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        return loss.detach()  # stays on the device: no sync per step

    def train_step(self, images, labels):
        self.model.train()
        images = torch.from_numpy(images).to(self.device).contiguous(memory_format=torch.channels_last)
        return self.device_train_step(images, torch.from_numpy(labels).to(self.device).long()).item()

    def learning_rates(self, steps):
        return np.array([self.set_learning_rate(int(step)) for step in steps], dtype=np.float32)

    # --- Epoch -------------------------------------------------------------------------------------------------------
    def train_epoch(self, epoch):
        start = time.perf_counter()
        self.model.train()
        batches = torch.from_numpy(self.epoch_batches(epoch)).to(self.device)
        losses, consumed = [], []
        for indices in batches:
            labels = self.train_labels[indices]
            losses.append(self.device_train_step(self.train_images[indices], labels))
            consumed.append(labels)
        mean_loss = torch.stack(losses).mean().item()  # .item() waits for the device: the epoch's time is real
        seconds = time.perf_counter() - start
        digest = contract.label_digest(torch.cat(consumed).cpu().numpy())
        return contract.EpochResult(mean_loss, batches.numel(), seconds, digest)

    # --- Evaluation --------------------------------------------------------------------------------------------------
    def device_eval_step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self.autocast():
            logits = self.network(images).float()
        return F.cross_entropy(logits, labels, reduction="sum"), (logits.argmax(1) == labels).sum()

    @torch.inference_mode()
    def evaluate(self):
        self.model.eval()
        loss_sum = correct = 0
        for start in range(0, len(self.test_labels), contract.EVAL_BATCH_SIZE):
            batch = slice(start, start + contract.EVAL_BATCH_SIZE)
            batch_loss, batch_correct = self.device_eval_step(self.test_images[batch], self.test_labels[batch])
            loss_sum, correct = loss_sum + batch_loss, correct + batch_correct  # device scalars: no sync per batch
        n = len(self.test_labels)
        return contract.Evaluation(loss_sum.item() / n, correct.item() / n)  # the one host read

    @torch.no_grad()
    def logits(self, images, train):
        self.model.train(train)
        images = torch.from_numpy(images).to(self.device).contiguous(memory_format=torch.channels_last)
        with self.autocast():
            return self.network(images).float().cpu().numpy()

    # --- Canonical weights -------------------------------------------------------------------------------------------
    # The canonical format is PyTorch's own state_dict, less BatchNorm's num_batches_tracked (unused with a momentum).
    def import_weights(self, weights):
        import_canonical(self.model, weights)
        self.optimizer = make_optimizer(self.model, lr=float(self.schedule[0]))
        self.step = 0

    def export_weights(self):
        return export_canonical(self.model)


def import_canonical(model: nn.Module, weights: contract.Weights) -> None:
    state = model.state_dict()
    with torch.no_grad():
        for name, array in contract.check_weights(weights).items():
            state[name].copy_(torch.from_numpy(array))  # copy_ keeps the parameter's channels-last layout


def export_canonical(model: nn.Module) -> contract.Weights:
    state = model.state_dict()
    return {name: state[name].detach().float().cpu().contiguous().numpy().copy() for name in contract.canonical_shapes()}
