"""GPU memory of a worker's processes, as the driver sees it: NVML sampled from a thread of the benchmark process.

This counts everything the worker holds on the GPU (CUDA context, allocator pools, cuDNN/XLA workspaces), which the
frameworks' own allocator peaks do not. Without a GPU or the NVML library the peak is None and `note` says why.
"""

from __future__ import annotations

import os
import threading

SAMPLE_INTERVAL_S = 0.05


class GpuMemorySampler:
    def __init__(self, pids: list[int]):
        self.pids = pids
        self.peak_bytes: int | None = None
        self.note = ""
        self._stop = threading.Event()
        self._thread = None
        try:
            import pynvml  # from nvidia-ml-py

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception as error:  # ImportError, or NVMLError_LibraryNotFound / DriverNotLoaded on GPU-less machines
            self._handles = []
            self.note = f"no GPU memory figures: NVML unavailable ({type(error).__name__}: {error})"
        if self._handles == [] and not self.note:
            self.note = "no GPU memory figures: NVML sees no GPU"

    def used_bytes(self) -> int | None:
        """The worker's GPU memory summed over its processes and all GPUs now; None if NVML lists none of them."""
        used = None
        for handle in self._handles:
            for process in self._nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if process.pid in self.pids and process.usedGpuMemory is not None:
                    used = (used or 0) + process.usedGpuMemory
        return used

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            try:
                used = self.used_bytes()
            except Exception as error:  # a sampler must never take the run down: record why the figure is missing
                self.note = f"NVML sampling stopped: {type(error).__name__}: {error}"
                self.peak_bytes = None
                return
            if used is not None:
                self.peak_bytes = max(self.peak_bytes or 0, used)

    def __enter__(self):
        if self._handles:
            self._thread = threading.Thread(target=self._sample, name=f"nvml-{self.pids[0]}", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self) -> None:
        """Stop sampling (the peak is final); stopping again does nothing."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            if self.peak_bytes is None and not self.note:
                pids = ", ".join(map(str, self.pids))
                self.note = (f"NVML never listed the worker (pid {pids}) as a GPU process: it used no GPU, or it runs "
                             "in a container without --pid=host, where NVML reports host PIDs")
            self._nvml.nvmlShutdown()
            self._thread = None


def cuda_problem() -> str | None:
    """What keeps CUDA from running here, as the driver sees it (no driver, no GPU, every GPU hidden); None if a GPU is
    there. Whether a framework's build has CUDA is the framework's to say, in its worker."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as error:  # NVMLError_LibraryNotFound or _DriverNotLoaded on machines without a driver
        return f"this machine has no NVIDIA driver (NVML: {error})"
    try:
        count = pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()
    if count == 0:
        return "the NVIDIA driver sees no GPU"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU"
    return None
