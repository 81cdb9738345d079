#!/bin/sh
# A cost-centre profile of the Haskell trainer: builds a profiling copy (dist-profiling/; needs Debian's
# libghc-hmatrix-prof libghc-vector-prof libghc-mtl-prof) and trains STEPS (default 20) batches of real MNIST with it
# (python -m bench.profile_haskell).
# Run from anywhere; PYTHON names the environment's interpreter (default: .venv/bin/python of the repository).
set -eu
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cd "$here"
export CABAL_CONFIG="$here/cabal-offline.config"
cabal build --offline --builddir=dist-profiling --enable-profiling --profiling-detail=exported-functions exe:mnist-resnet
program="$(cabal list-bin --offline --builddir=dist-profiling --enable-profiling exe:mnist-resnet)"
cd "$repo"
exec "${PYTHON:-$repo/.venv/bin/python}" -m bench.profile_haskell "$program" "${1:-20}" ${2:+"$2"}
