#!/usr/bin/env bash
# From a fresh clone to a trained, evaluated checkpoint on this machine, offline:
#   set up .venv, install Openclipart (Debian), train effnet_minilm heads-only on it,
#   evaluate on the test split. Then serve it: see the last line this prints.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/install_system_deps.sh
run=runs/quickstart_$(date +%Y%m%d_%H%M%S)
.venv/bin/python -m training.train experiment=openclipart_heads hydra.run.dir="$run" "$@"
.venv/bin/python -m evaluation.evaluate checkpoint="$run/best" split=test output_dir="$run/test_report"
echo
echo "checkpoint:  $run/best"
echo "test report: $run/test_report/report.md"
echo "serve it:    .venv/bin/python -m serving checkpoint=$run/best"
