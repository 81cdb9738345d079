# syntax=docker/dockerfile:1
# MNIST in every framework, GPU image: PyTorch, Lightning, TensorFlow and JAX, CUDA builds, in one virtual environment;
# the Haskell row (CPU: hmatrix over OpenBLAS) built with Ubuntu's GHC.
#
#   docker build -t mnist-every-framework .
#   docker run --rm --gpus all --pid=host -v "$PWD/results:/app/results" -v mnist-cache:/data/cache mnist-every-framework
#
# The base is CUDA's smallest image: every framework brings its CUDA libraries (cuDNN included) as pip wheels, so a
# -cudnn-runtime base would add ~3 GB of duplicate libraries. -base still sets what the NVIDIA container toolkit
# reads (driver capabilities compute,utility: libcuda and NVML; and NVIDIA_REQUIRE_CUDA, which makes `docker run`
# refuse a driver too old for CUDA 12.6 with a clear message). 12.6 is the CUDA of the wheels (docker/requirements-gpu.txt).
FROM nvidia/cuda:12.6.3-base-ubuntu24.04

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

COPY --chmod=755 docker/entrypoint.sh /usr/local/bin/mnist-entrypoint
WORKDIR /app
COPY --chown=bench:bench . /app

USER ${UID}:${GID}
RUN implementations/haskell/build.sh
# Results go to /app/results (mount a host folder there); MNIST is cached in /data/cache (mount a volume there), or
# read from a mounted folder named by MNIST_DIR. The default command runs the benchmark; `test` runs the test command.
ENTRYPOINT ["/usr/local/bin/mnist-entrypoint"]
CMD ["bench"]
