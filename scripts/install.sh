#!/usr/bin/env bash
# One-step set-up on a fresh machine: a virtual environment in .venv with the CPU torch wheel pinned first,
# then medsim and its dependencies under the same pin.
#   bash scripts/install.sh          # runtime (CPU host: onnxruntime + faiss-cpu)
#   bash scripts/install.sh --dev    # + test tools, the Triton client and OpenVINO/NNCF (extras dev, triton, openvino)
#   MEDSIM_EXTRAS=gpu bash scripts/install.sh   # GPU host: onnxruntime-gpu, faiss-gpu, tensorrt instead
#   MEDSIM_TORCH_INDEX=https://download.pytorch.org/whl/cpu bash scripts/install.sh
#       # a CPU host whose pip has no CPU torch wheel at hand (plain PyPI's torch 2.13.0 on Linux is the CUDA build)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
venv="${MEDSIM_VENV:-$here/.venv}"
extras="${MEDSIM_EXTRAS:-cpu}"
[[ "${1:-}" == "--dev" ]] && extras="$extras,dev,triton,openvino"  # the tests also cover Triton and OpenVINO

step() { echo "[install] $*" >&2; }  # one line per step; pip's own output stays quiet (-q)

python="${PYTHON:-python3}"
if [[ ! -x "$venv/bin/python" ]]; then
  step "1/3 creating the virtual environment $venv"
  "$python" -m venv "$venv"
else
  step "1/3 reusing the virtual environment $venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
# torch first, pinned: a bare torch/monai requirement would otherwise pull a multi-GB CUDA build.
torch_index=()
[[ -n "${MEDSIM_TORCH_INDEX:-}" ]] && torch_index=(--index-url "$MEDSIM_TORCH_INDEX")
step "2/3 installing torch 2.13.0 (CPU build unless MEDSIM_TORCH_INDEX says otherwise; about a minute)"
"${pip[@]}" install "${torch_index[@]}" -c constraints.txt "torch==2.13.0" 2> >(grep -v 'is ignored' >&2)
step "3/3 installing medsim with extras [$extras] and its dependencies (MONAI, onnx, faiss, ...)"
"${pip[@]}" install -c constraints.txt -e ".[$extras]" 2> >(grep -v 'is ignored' >&2)
step "done: medsim installed in $venv (extras: $extras); try $venv/bin/medsim --help"
