#!/bin/sh
# The last step of the test command (`make test`, and the image's `test`): a smoke benchmark of every installed
# framework, written to a new file, then gated against the committed baseline. Run from the repository root with the
# environment's python first on PATH; extra arguments go to `pytest bench`. SMOKE_JSON names the new run's file (it must
# not exist), BASELINE another baseline.
set -eu

smoke_json="${SMOKE_JSON:-results/tmp/smoke-$(date +%Y%m%dT%H%M%S).json}"
python -m pytest bench --preset smoke --benchmark-json="$smoke_json" "$@"
# Epoch times are compared relative to the matmul each session times (bench/gate.py): +35% fails, so a framework
# 1.5x slower does and a uniformly slower runner does not. On another device (a GPU box, another CPU model) the gate
# checks accuracy only. Peak RSS moved by 13% between identical CPU runs: +50%.
exec python -m bench.gate --baseline "${BASELINE:-results/baseline-smoke-cpu.json}" "$smoke_json" \
    --max-memory-increase 0.5 --allow-device-change
