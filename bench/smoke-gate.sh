#!/bin/sh
# The last step of the test command (`make test`, and the image's `test`): a smoke benchmark of every installed
# framework, written to a new file, then gated. Run from the repository root with the environment's python first on
# PATH; extra arguments go to `pytest bench`. SMOKE_JSON names the new run's file (it must not exist), BASELINE another
# baseline, HISTORY another folder of runs to gate against.
set -eu

smoke_json="${SMOKE_JSON:-results/tmp/smoke-$(date +%Y%m%dT%H%M%S).json}"
history="${HISTORY:-results/history-smoke-cpu}"
python -m pytest bench --preset smoke --benchmark-json="$smoke_json" "$@"
# A framework with 3 or more runs of this machine, device and configuration in the committed history is gated against
# its recent runs there (bench.history's statistics: time in units of the machine's speed, accuracy and memory, each
# against the spread of those runs). The others are gated against the committed baseline: epoch times relative to the
# matmul each session times (+35% fails, so a framework 1.5x slower does and a uniformly slower runner does not); on
# another device (a GPU box, another CPU model) accuracy only. Peak RSS moved by 13% between identical CPU runs: +50%.
# The history's runs came from one machine in one session, while CI draws another runner of the same description each
# time: its minimum effects are the baseline's tolerances, not the one machine's narrower noise.
if [ -d "$history" ]; then
    set -- --history "$history" --min-time-change 0.35 --min-memory-change 0.5 --min-accuracy-change 1
else
    set --
fi
exec python -m bench.gate --baseline "${BASELINE:-results/baseline-smoke-cpu-epyc-3072.json}" "$smoke_json" \
    --max-memory-increase 0.5 --allow-device-change "$@"
