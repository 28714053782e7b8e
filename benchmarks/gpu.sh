#!/usr/bin/env bash
# The GPU session in one command: every benchmark on CUDA in bfloat16, the LoRA-expert one also compiled, sizes
# meant for one H100 / H200, under 8 minutes in all (run_all.py's --budget), one summary table at the end.
#   bash benchmarks/gpu.sh --output "$OUT/benchmarks"        # extra arguments go to run_all.py
# PYTHON picks the interpreter (default: python on PATH).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "${PYTHON:-python}" "$here/run_all.py" --device cuda --dtype bfloat16 --compile "$@"
