"""ResNet18 on MNIST in PyTorch: the reference implementation that every other framework is checked against.

A page of the Rosetta stone: the sections of contract.PAGE_SECTIONS, in order, and the names every page uses.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.nn.functional import all_reduce
from torch.nn.parallel import DistributedDataParallel

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


class CpuSyncBatchNorm2d(nn.BatchNorm2d):
    """nn.SyncBatchNorm for CPU replicas, which nn.SyncBatchNorm refuses ("only work with GPU modules"): the statistics
    of the global batch, summed over the replicas by torch.distributed's differentiable all_reduce, so that the backward
    pass sums over them too. Mean first, then the variance around it (two passes, as accurate as one device's)."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        dtype, x = x.dtype, x.float()  # statistics in fp32, also under autocast
        n = x.numel() // x.shape[1] * dist.get_world_size()  # equal shards
        mean = all_reduce(x.sum((0, 2, 3))) / n
        centered = x - mean[:, None, None]
        var = all_reduce(centered.square().sum((0, 2, 3))) / n
        with torch.no_grad():  # PyTorch's running update, with the unbiased variance of the global batch
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)
        scale = torch.rsqrt(var + self.eps) * self.weight
        return (centered * scale[:, None, None] + self.bias[:, None, None]).to(dtype)


def synchronize_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm2d normalizing with the global batch's statistics, its parameters and statistics kept."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            synchronized = CpuSyncBatchNorm2d(child.num_features, child.eps, child.momentum).to(device)
            synchronized.load_state_dict(child.state_dict())
            setattr(module, name, synchronized)
        else:
            synchronize_batchnorm(child, device)
    return module


# --- State -----------------------------------------------------------------------------------------------------------
def init_data_parallel(config: contract.RunConfig) -> tuple[int, int]:
    """This process's replica (rank) and the number of replicas, from torchrun's environment variables, which the
    harness sets as torchrun does: one process per replica, each running this page."""
    job = contract.job_process()
    if job.processes != config.replicas:
        raise contract.ConfigError(f"--replicas {config.replicas}: the PyTorch page trains one process per replica and "
                                   f"was started as {job.processes}; start it with torchrun --nproc-per-node "
                                   f"{config.replicas} (the harness does this for registered frameworks)")
    return job.rank, job.processes


def process_group_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"  # torch.distributed's collectives: NCCL on GPUs, gloo on CPU


def devices_environment(name: str) -> dict:
    """The environment's device fields: with replicas, every replica's device (gathered) and this one's threads."""
    if not dist.is_initialized():
        return {"device": name}
    names = [None] * dist.get_world_size()
    dist.all_gather_object(names, name)
    return {"device": name, "devices": names, "threads_per_replica": torch.get_num_threads()}


def mean_over_replicas(values: torch.Tensor) -> torch.Tensor:
    """Each replica's means over its shard as means over the global batch (equal shards); as they are on one device."""
    if dist.is_initialized():
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


def batches_of_all_replicas(shards: torch.Tensor) -> torch.Tensor:
    """This replica's [steps, shard] values as the global batches' [steps, batch], in the contract's order."""
    if not dist.is_initialized():
        return shards
    gathered = [torch.empty_like(shards) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, shards)
    return torch.cat(gathered, dim=1)


def select_device(config: contract.RunConfig) -> torch.device:
    if config.device == "cuda" and not torch.cuda.is_available():
        raise contract.ConfigError(f"--device cuda: PyTorch sees no CUDA GPU ({cuda_problem()}); use --device cpu")
    cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", contract.job_process().local_rank) if cuda else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # this replica's GPU: NCCL's and the CUDA allocator's current device
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = config.allow_tf32
    return device


def cuda_problem() -> str:
    """What keeps this torch from CUDA: its build, or (torch's own words) the driver or the device."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build: install a CUDA build of torch"
    try:
        torch.cuda.init()
    except RuntimeError as error:  # "Found no NVIDIA driver on your system. ...", or no device
        return f"torch {torch.__version__} is built for CUDA {torch.version.cuda}: {str(error).splitlines()[0]}"
    return "no CUDA device is visible (CUDA_VISIBLE_DEVICES?)"


def device_data(data: contract.Data, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The whole dataset on the device, images channels-last: an epoch only indexes it."""
    images = lambda array: torch.from_numpy(array).to(device).contiguous(memory_format=torch.channels_last)
    labels = lambda array: torch.from_numpy(array).to(device).long()
    return images(data.train_images), labels(data.train_labels), images(data.test_images), labels(data.test_labels)


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.SGD:
    # PyTorch's momentum formulation is the contract's; the schedule sets the rate (before each step, or via LambdaLR).
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=contract.SGD_MOMENTUM)


class TorchTrainer(contract.Trainer):
    data_parallel = "torch.distributed: DistributedDataParallel, one process per replica"

    def build(self, weights):
        self.rank, self.replicas = init_data_parallel(self.config)
        self.device = select_device(self.config)
        torch.backends.cudnn.benchmark = True  # static shapes: pick the fastest convolution algorithms once
        # Channels-last (NHWC) convolutions are faster with oneDNN on CPU (620 vs 530 images/s here) and tensor cores.
        self.model = ResNet18().to(self.device, memory_format=torch.channels_last)
        network = self.model
        if self.replicas > 1:  # env:// reads MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE
            dist.init_process_group(process_group_backend(self.device))
            self.model = synchronize_batchnorm(self.model, self.device)
            # DDP averages the gradients over the replicas during backward; the synchronized BatchNorm statistics are
            # equal everywhere, so broadcasting rank 0's (DDP's default) would only cost time.
            network = DistributedDataParallel(self.model, device_ids=[self.device] if self.device.type == "cuda" else None,
                                              broadcast_buffers=False)
        self.network = torch.compile(network) if self.config.compile else network
        self.train_images, self.train_labels, self.test_images, self.test_labels = device_data(self.data, self.device)
        self.import_weights(weights)

    def environment(self):
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "CPU"
        return {"framework_version": str(torch.__version__), **devices_environment(name)}  # a str, not torch's class

    def memory_peak_bytes(self):
        return torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None

    def trainable_parameters(self):
        return sum(parameter.numel() for parameter in self.model.parameters() if parameter.requires_grad)

    def autocast(self):
        if self.config.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # --- Train step --------------------------------------------------------------------------------------------------
    def set_learning_rate(self, step: int) -> float:
        for group in self.optimizer.param_groups:  # nanoGPT's way: the schedule sets the rate before each step
            group["lr"] = float(self.schedule[step])
        return self.optimizer.param_groups[0]["lr"]

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One SGD step on this replica's shard of the batch; DDP averages the gradients over the replicas."""
        self.set_learning_rate(self.step)
        with self.autocast():
            loss = F.cross_entropy(self.network(images), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        return loss.detach()  # stays on the device: no sync per step

    def train_on_batch(self, images, labels):
        self.model.train()
        shard = contract.replica_shard(len(labels), self.rank, self.replicas)
        images = torch.from_numpy(images[shard]).to(self.device).contiguous(memory_format=torch.channels_last)
        loss = self.train_step(images, torch.from_numpy(labels[shard]).to(self.device).long())
        return mean_over_replicas(loss).item()

    def learning_rates(self, steps):
        return np.array([self.set_learning_rate(int(step)) for step in steps], dtype=np.float32)

    # --- Epoch -------------------------------------------------------------------------------------------------------
    def train_batches(self, batches):
        start = time.perf_counter()
        self.model.train()
        shards = torch.from_numpy(batches[:, contract.replica_shard(batches.shape[1], self.rank, self.replicas)])
        losses, consumed, progress = [], [], self.progress_meter(batches)
        for step, indices in enumerate(shards.to(self.device), start=1):
            labels = self.train_labels[indices]
            losses.append(self.train_step(self.train_images[indices], labels))
            consumed.append(labels)
            progress.step(step, wait=losses[-1].item)
        mean_loss = mean_over_replicas(torch.stack(losses)).mean().item()  # .item() waits: the time is real
        seconds = time.perf_counter() - start
        consumed = batches_of_all_replicas(torch.stack(consumed))
        return contract.EpochResult(mean_loss, batches.size, seconds, contract.label_digest(consumed.cpu().numpy()))

    # --- Evaluation --------------------------------------------------------------------------------------------------
    def eval_step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self.autocast():
            logits = self.network(images).float()
        return F.cross_entropy(logits, labels, reduction="sum"), (logits.argmax(1) == labels).sum()

    @torch.inference_mode()
    def evaluate(self):
        self.model.eval()
        n = len(self.test_labels)
        shard = contract.replica_shard(n, self.rank, self.replicas)  # each replica evaluates its part of the test set
        images, labels = self.test_images[shard], self.test_labels[shard]
        loss_sum = correct = 0
        for start in range(0, len(labels), contract.EVAL_BATCH_SIZE):
            batch = slice(start, start + contract.EVAL_BATCH_SIZE)
            batch_loss, batch_correct = self.eval_step(images[batch], labels[batch])
            loss_sum, correct = loss_sum + batch_loss, correct + batch_correct  # device scalars: no sync per batch
        totals = torch.stack([loss_sum, correct.to(loss_sum.dtype)])  # counts up to 10,000 are exact in float32
        if self.replicas > 1:
            dist.all_reduce(totals)
        loss_sum, correct = totals.tolist()  # the one host read
        return contract.Evaluation(loss_sum / n, round(correct) / n)

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
