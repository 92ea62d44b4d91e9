#!/usr/bin/env bash
# The GPU check: everything leanprop needs to know from a CUDA machine, in at most 4 minutes.
#
#   benchmarks/gpu_check.sh OUT_DIR             # on a CUDA machine, from the source tree (no install, no network)
#   benchmarks/gpu_check.sh --dry-run OUT_DIR   # on any machine: checks the script's own pieces (CI runs it)
#
# Runs from the repository's source tree with the machine's own PyTorch (PYTHONPATH=src; $PYTHON, default
# python3), each step under `timeout`, and writes into OUT_DIR:
#   gpu_check.log    every step's output        summary.txt   each step: ok/FAIL/skipped, seconds
#   pytest_cuda.xml  the tests marked `cuda` (mode matrix on CUDA, nccl with one rank, memory figures from
#                    torch.cuda.max_memory_allocated, C kernels bypassed on CUDA tensors, resume + eval on CUDA)
#   matrix.jsonl     leanprop bench matrix --quick --device cuda
#   memory.jsonl     leanprop bench memory --device cuda (dense, blpa4, swat-u90-packed on resnet20)
#   modes.jsonl      leanprop bench modes --device cuda (gradients against eager fp32; compiled if time is left)
#   benchmarks.md    leanprop report of the above (its "On a CUDA GPU" section)
# Copy the JSONL files into benchmarks/results/ and run `leanprop report` to put them into docs/benchmarks.md.
# Exit status: 0 when every step passed, 1 when one failed, 2 on bad usage or no GPU.
set -uo pipefail

usage() { echo "usage: benchmarks/gpu_check.sh [--dry-run] OUT_DIR" >&2; exit 2; }
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
[ $# -eq 1 ] || usage
case "$1" in -*) usage ;; esac

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$1" || { echo "gpu_check: cannot create $1" >&2; exit 2; }
OUT="$(cd "$1" && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null || PY=python
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 LEANPROP_ALLOCATOR=system
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
LOG="$OUT/gpu_check.log"
SUMMARY="$OUT/summary.txt"
: >"$LOG"
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-235}  # the whole check stays under 4 minutes
FAILED=0

left() { echo $((BUDGET - ($(date +%s) - START))); }
note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME SECONDS CMD...: run CMD under timeout (at most the budget left but $RESERVE s), log it, record ok/FAIL
RESERVE=0
step() {
  local name="$1" limit="$2"; shift 2
  local rest; rest=$(($(left) - RESERVE - 5))
  [ "$limit" -gt "$rest" ] && limit=$rest
  if [ "$limit" -lt 10 ]; then note "skip $name (out of time)"; return 0; fi
  echo "== $name ($limit s max): $*" | tee -a "$LOG"
  local t0=$(date +%s) rc
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then note "ok   $name ($(( $(date +%s) - t0 )) s)"
  else
    FAILED=1
    [ $rc -eq 124 ] && note "FAIL $name (timed out after $limit s)" || note "FAIL $name (exit $rc, $(( $(date +%s) - t0 )) s)"
    tail -n 25 "$LOG" >&2
  fi
  return 0
}

PYTEST=("$PY" -m pytest -p no:cacheprovider -q -rs -o addopts= --junitxml="$OUT/pytest_cuda.xml" tests)
MATRIX=(bench matrix --quick --device cuda --progress off --out "$OUT/matrix.jsonl")
MEMORY=(bench memory --model resnet20 --batch 64 --method dense,blpa4,swat-u90-packed --device cuda --progress off
        --probe-timeout 60 --jsonl "$OUT/memory.jsonl")
MODES=(bench modes --device cuda --modes cuda-fp32,cuda-bf16,cuda-fp16,cuda-fp32-nhwc --progress off
       --out "$OUT/modes.jsonl")
MODES_COMPILED=(bench modes --methods dense,swat-u90,blpa4 --modes cuda-fp32-compile --progress off
                --out "$OUT/modes.jsonl")
REPORT=(report --results "$OUT" --out "$OUT/benchmarks.md" --plots "$TMP/plots" --readme "")

: >"$SUMMARY"
if [ $DRY -eq 1 ]; then
  note "gpu_check dry run $(date -u +%FT%TZ): the script's pieces, no GPU needed"
  step "tools" 10 bash -c 'command -v timeout >/dev/null && command -v '"$PY"' >/dev/null'
  n=$("$PY" -m pytest -p no:cacheprovider -o addopts= --collect-only -q -m cuda tests 2>>"$LOG" | grep -c '::')
  echo "cuda tests collected: $n" | tee -a "$LOG"
  step "collect cuda tests" 60 test "$n" -gt 0
  step "imports, bench arguments" 60 "$PY" - "${MATRIX[@]}" -- "${MEMORY[@]}" -- "${MODES[@]}" -- "${MODES_COMPILED[@]}" \
    -- "${REPORT[@]}" <<'PY'
import sys

import torch

import leanprop.bench.matrix
import leanprop.bench.modes
import leanprop.modes
import leanprop.train.trainer
from leanprop.cli import _parser

print("torch", torch.__version__, "leanprop", leanprop.modes.__name__, leanprop.train.trainer.__name__,
      leanprop.bench.matrix.__name__, leanprop.bench.modes.__name__)
cmd = []
for a in [*sys.argv[1:], "--"]:
    if a == "--":
        _parser().parse_args(cmd)  # exits 2 on an argument the command does not take
        print("parsed: leanprop", " ".join(cmd[:2]))
        cmd = []
    else:
        cmd.append(a)
PY
  note "dry run done: $([ $FAILED -eq 0 ] && echo ok || echo FAILED)"
  exit $FAILED
fi

note "gpu_check $(date -u +%FT%TZ) in $ROOT, git $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >>"$LOG" 2>&1; then
  note "no CUDA GPU visible to $PY (torch.cuda.is_available() is False): nothing to check; --dry-run checks the script"
  exit 2
fi
step "environment" 30 bash -c "nvidia-smi -L 2>/dev/null; $PY -c \"import torch; p = torch.cuda.get_device_properties(0); \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), '|', p.name, \
p.total_memory // 2**20, 'MiB', 'bf16' if torch.cuda.is_bf16_supported() else 'no bf16')\""
RESERVE=20  # what the report needs at the end
step "cuda tests" 110 "${PYTEST[@]}" -m "cuda and not slow"
step "bench matrix" 50 "$PY" -m leanprop "${MATRIX[@]}"
step "bench memory" 40 "$PY" -m leanprop "${MEMORY[@]}"
step "bench modes" 45 "$PY" -m leanprop "${MODES[@]}"
step "bench modes (compiled)" 120 "$PY" -m leanprop "${MODES_COMPILED[@]}"  # whatever time is left
RESERVE=0
step "report" 20 "$PY" -m leanprop "${REPORT[@]}"
note "done in $(( $(date +%s) - START )) s: $([ $FAILED -eq 0 ] && echo 'every step passed' || echo 'some step FAILED')"
exit $FAILED
