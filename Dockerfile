# syntax=docker/dockerfile:1
# MNIST in every framework, GPU image: PyTorch, Lightning, TensorFlow, JAX, Flax, Keras 3 and burn, CUDA builds, in one
# virtual environment; the Haskell row (CPU: hmatrix over OpenBLAS) built with Ubuntu's GHC.
#
#   docker build -t mnist-every-framework .
#   docker run --rm --gpus all --pid=host -v "$PWD/results:/app/results" -v mnist-cache:/data/cache mnist-every-framework
#
# The base is CUDA's smallest image: every framework brings its CUDA libraries (cuDNN included) as pip wheels, so a
# -cudnn-runtime base would add ~3 GB of duplicate libraries. -base still sets what the NVIDIA container toolkit
# reads (driver capabilities compute,utility: libcuda and NVML; and NVIDIA_REQUIRE_CUDA, which makes `docker run`
# refuse a driver too old for CUDA 12.6 with a clear message). 12.6 is the CUDA of the wheels (docker/requirements-gpu.txt).
FROM nvidia/cuda:12.6.3-base-ubuntu24.04 AS base

# The burn row's Rust extension, built with burn's CUDA backend in a stage of its own: the Rust toolchain stays out of
# the image. Same base (glibc, Python 3.12: the wheel's ABI). cudarc loads the driver and NVRTC at run time, so no CUDA
# toolkit is needed to build; CUDARC_CUDA_VERSION names the CUDA it targets (nvcc would be asked otherwise).
FROM base AS burn
ENV DEBIAN_FRONTEND=noninteractive PATH=/root/.cargo/bin:$PATH CUDARC_CUDA_VERSION=12060
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl gcc libc6-dev python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
    | sh -s -- -y --profile minimal --default-toolchain 1.95.0 \
    && python3 -m venv /opt/maturin && /opt/maturin/bin/pip install --no-cache-dir maturin==1.16.0
COPY implementations/rust_burn /src/rust_burn
RUN --mount=type=cache,target=/root/.cargo/registry --mount=type=cache,target=/src/rust_burn/target \
    /opt/maturin/bin/maturin build --release --features cuda --interpreter python3 \
        --manifest-path /src/rust_burn/Cargo.toml --out /wheels

FROM base
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    XDG_CACHE_HOME=/data/cache

# Ubuntu's patch releases replace each other in the archive: exact version pins would soon break the build.
# git: pytest-benchmark names saved runs by commit, and the devcontainer's workspace is a checkout. GHC, cabal, hmatrix,
# vector and OpenBLAS: the Haskell row (implementations/haskell/build.sh builds it offline against them).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv git \
        ghc cabal-install libghc-hmatrix-dev libghc-vector-dev libopenblas-dev \
    && rm -rf /var/lib/apt/lists/*

# A non-root user. ubuntu:24.04's own "ubuntu" user holds UID 1000, the usual owner of a bind-mounted results folder;
# build with --build-arg UID=$(id -u) if yours differs. The MNIST cache is writable by any UID (docker run --user).
ARG UID=1000
ARG GID=1000
RUN if id ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
    && groupadd --gid "$GID" --non-unique bench \
    && useradd --uid "$UID" --gid "$GID" --non-unique --create-home --shell /bin/bash bench \
    && install -d -m 1777 /data/cache \
    && install -d -o bench -g bench /app /app/results

# Dependencies before the source: editing the code does not reinstall the frameworks. The venv stays root-owned
# (read-only to the user); the pip cache lives in a build cache mount, never in a layer.
COPY docker/requirements-gpu.txt /tmp/requirements-gpu.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -m venv "$VIRTUAL_ENV" \
    && pip install --requirement /tmp/requirements-gpu.txt

COPY --from=burn /wheels /tmp/wheels
RUN pip install --no-cache-dir /tmp/wheels/*.whl

COPY --chmod=755 docker/entrypoint.sh /usr/local/bin/mnist-entrypoint
WORKDIR /app
COPY --chown=bench:bench . /app

USER ${UID}:${GID}
RUN implementations/haskell/build.sh
# Results go to /app/results (mount a host folder there); MNIST is cached in /data/cache (mount a volume there), or
# read from a mounted folder named by MNIST_DIR. The default command runs the benchmark; `test` runs the test command.
ENTRYPOINT ["/usr/local/bin/mnist-entrypoint"]
CMD ["bench"]
