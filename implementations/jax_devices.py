"""Devices and data parallel of the JAX pages (Haiku, Flax NNX), written once: both train on the same device layout.

One process: N devices of this machine (on a CPU, N XLA host devices). A launched job of several processes
(contract.JobProcess, one replica each, on one machine or several): jax.distributed joins them, `jax.devices()` lists
every process's devices, and one jitted program runs over all of them, each process driving its own; the collectives
cross processes (gloo between CPUs, NCCL between GPUs).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from implementations import contract


def select_devices(config: contract.RunConfig) -> list[jax.Device]:
    """One device per replica: GPUs where there are (or --device cuda), else the CPU."""
    job = contract.job_process(config)
    if job.processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # XLA:CPU's own cannot cross processes
        # JAX's own variable first: under torchrun, torchrun's store holds MASTER_PORT.
        coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS") or job.coordinator
        try:  # one GPU per process, as torchrun's ranks take them (LOCAL_RANK); the CPU is one device per process
            jax.distributed.initialize(coordinator, job.processes, job.rank,
                                       local_device_ids=None if config.device == "cpu" else [job.local_rank])
        except jax.errors.JaxRuntimeError as error:
            if "Failed to start RPC server" not in str(error):
                raise
            raise contract.ConfigError(f"jax.distributed: rank 0 cannot listen on {coordinator}, which is in use (under "
                                       "torchrun, by torchrun's store); set JAX_COORDINATOR_ADDRESS to rank 0's host "
                                       "and a free port, the same for every process") from None
    elif config.replicas > 1:  # the CPU as N XLA host devices: set before the backend starts, harmless on a GPU machine
        jax.config.update("jax_num_cpu_devices", config.replicas)
    if config.device == "cpu":
        devices = jax.devices("cpu")
    elif config.device == "cuda" and jax.default_backend() != "gpu":
        raise contract.ConfigError("--device cuda: JAX sees no CUDA GPU (install jax[cuda12] or jax[cuda13]); "
                                   "use --device cpu")
    else:
        devices = jax.devices()  # JAX's default backend: the GPUs when there are
    if len(devices) < config.replicas:
        raise contract.ConfigError(f"--replicas {config.replicas}: JAX sees {len(devices)} {devices[0].platform} "
                                   "device(s); lower --replicas")
    # fp32 matmuls and convolutions on GPU: TF32 tensor cores or strict fp32 (no effect on CPU).
    jax.config.update("jax_default_matmul_precision", "tensorfloat32" if config.allow_tf32 else "float32")
    return devices[:config.replicas]


def own_device(devices: list[jax.Device]) -> jax.Device:
    """The first of `devices` that this process drives (in a job, the others belong to other processes)."""
    return next(device for device in devices if device.process_index == jax.process_index())


def data_parallel_shardings(devices: list[jax.Device]) -> tuple[NamedSharding, NamedSharding]:
    """Data parallel with jax.sharding: the model, its state and the dataset replicated on every device, each batch
    split into contiguous shards along a "batch" mesh axis. jit compiles the step for the global batch and XLA inserts
    the all-reduces: gradients and BatchNorm's batch statistics are those of the whole batch, as on one device."""
    mesh = Mesh(np.array(devices), ("batch",))
    return NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("batch"))


def placement(config: contract.RunConfig) -> tuple[list[jax.Device], jax.Device, NamedSharding, NamedSharding]:
    """A page's devices (one per replica), the one this process drives, and the two shardings of data parallel."""
    devices = select_devices(config)
    return devices, own_device(devices), *data_parallel_shardings(devices)


def devices_environment(devices: list[jax.Device]) -> dict:
    names = [device.device_kind if device.platform == "gpu" else "CPU" for device in devices]
    if len(devices) == 1:
        return {"device": names[0]}
    # XLA:CPU's host devices (or each process of a job) use a thread pool of every core; a GPU replica is its GPU.
    threads = len(os.sched_getaffinity(0)) if devices[0].platform == "cpu" else None
    return {"device": names[0], "devices": names, "threads_per_replica": threads}


def device_data(data: contract.Data, placement: NamedSharding) -> tuple[jax.Array, ...]:
    """The whole dataset on the device(s), NHWC (transposed once here): an epoch only indexes it."""
    put = lambda array: jax.device_put(array, placement)
    return (put(contract.nhwc(data.train_images)), put(data.train_labels), put(contract.nhwc(data.test_images)),
            put(data.test_labels))


def allocator_peak_bytes(device: jax.Device) -> int | None:
    stats = device.memory_stats()  # None on CPU
    return stats.get("peak_bytes_in_use") if stats else None
