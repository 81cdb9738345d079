#!/bin/sh
# The image's entry point.
#   bench [pytest options]   (the default) MNIST, then `pytest bench`; results numbered in /app/results/history
#   test [pytest options]    MNIST, then the test command: `pytest tests`, then a smoke benchmark gated against the
#                            committed baseline (bench/smoke-gate.sh, as `make test`)
#   anything else            run as given (bash, python -m bench run pytorch, ...)
set -eu

# MNIST: a mounted folder named by MNIST_DIR is used as is; otherwise it is downloaded once into the cache
# (/data/cache, a volume) and MNIST_DIR points there, which `pytest tests` needs.
mnist() {
    if [ -z "${MNIST_DIR:-}" ]; then
        python -m bench.data fetch
        MNIST_DIR=$(python -c 'from bench.data import default_cache_dir; print(default_cache_dir())')
        export MNIST_DIR
    fi
}

case "${1:-bench}" in
    bench)
        if [ "$#" -gt 0 ]; then shift; fi
        mnist
        exec pytest bench --benchmark-autosave --benchmark-storage=file:///app/results/history "$@"
        ;;
    test)
        shift
        mnist
        pytest tests
        exec sh bench/smoke-gate.sh "$@"
        ;;
    *)
        exec "$@"
        ;;
esac
