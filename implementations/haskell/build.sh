#!/bin/sh
# Builds the Haskell trainer offline, against the packages GHC already has (Debian: apt-get install -y ghc
# libghc-hmatrix-dev libghc-vector-dev libopenblas-dev cabal-install), and installs it as bin/mnist-resnet, the program
# trainer.py runs and the registry looks for. cabal rebuilds only what changed. `build.sh test` then runs the gradient
# checks (test/GradientCheck.hs).
set -eu
cd "$(dirname "$0")"
export CABAL_CONFIG="$PWD/cabal-offline.config"  # no package repository: cabal would try to download Hackage's index
cabal build --offline exe:mnist-resnet
mkdir -p bin
cp "$(cabal list-bin --offline exe:mnist-resnet)" bin/mnist-resnet.new
mv bin/mnist-resnet.new bin/mnist-resnet  # a rename: a running trainer keeps its program
if [ "${1:-}" = test ]; then
    cabal test --offline --test-show-details=direct
fi
