#!/usr/bin/env bash
# One-step set-up on a fresh machine: a virtual environment in .venv with the CPU torch wheel pinned first,
# then medsim and its dependencies under the same pin.
#   bash scripts/install.sh          # runtime (CPU host: onnxruntime + faiss-cpu)
#   bash scripts/install.sh --dev    # + test tools
#   MEDSIM_EXTRAS=gpu bash scripts/install.sh   # GPU host: onnxruntime-gpu, faiss-gpu, tensorrt instead
#   MEDSIM_TORCH_INDEX=https://download.pytorch.org/whl/cpu bash scripts/install.sh
#       # a CPU host whose pip has no CPU torch wheel at hand (plain PyPI's torch 2.13.0 on Linux is the CUDA build)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
venv="${MEDSIM_VENV:-$here/.venv}"
extras="${MEDSIM_EXTRAS:-cpu}"
[[ "${1:-}" == "--dev" ]] && extras="$extras,dev"

python="${PYTHON:-python3}"
if [[ ! -x "$venv/bin/python" ]]; then
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
# torch first, pinned: a bare torch/monai requirement would otherwise pull a multi-GB CUDA build.
torch_index=()
[[ -n "${MEDSIM_TORCH_INDEX:-}" ]] && torch_index=(--index-url "$MEDSIM_TORCH_INDEX")
"${pip[@]}" install "${torch_index[@]}" -c constraints.txt "torch==2.13.0" 2> >(grep -v 'is ignored' >&2)
"${pip[@]}" install -c constraints.txt -e ".[$extras]" 2> >(grep -v 'is ignored' >&2)
echo "medsim installed in $venv (extras: $extras)" >&2
