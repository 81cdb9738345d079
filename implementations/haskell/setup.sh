#!/bin/sh
# The Haskell row's set-up (`make setup`): installs GHC and the libraries where it may (root with apt-get, as in CI),
# then builds the program (an existing build is reused: cabal rebuilds only what changed). Without them, it says what
# to install and leaves the row to be skipped as "not installed".
set -eu
packages="ghc libghc-hmatrix-dev libghc-vector-dev libopenblas-dev cabal-install"
present() {
    command -v cabal >/dev/null 2>&1 && ghc-pkg --simple-output list hmatrix 2>/dev/null | grep -q hmatrix \
        && ghc-pkg --simple-output list vector 2>/dev/null | grep -q vector
}
if ! present && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $packages
fi
if present; then
    exec "$(dirname "$0")/build.sh"
fi
echo "haskell: GHC, cabal or hmatrix missing, the row is skipped as not installed; to add it: apt-get install -y $packages"
