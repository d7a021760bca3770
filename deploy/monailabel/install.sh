#!/usr/bin/env bash
# The MONAI Label environment for medsim's annotation-assistance app, in its own venv (default
# deploy/monailabel/.venv): MONAI Label 0.8.5 pins packages medsim cannot share (see the README section
# "Annotation assistance with MONAI Label").
#   bash deploy/monailabel/install.sh
#   MEDSIM_LABEL_VENV=/opt/medsim-label bash deploy/monailabel/install.sh
#
# Route: the CPU torch wheel first and pinned (constraints.txt), then medsim with its CPU runtime
# (onnxruntime, faiss-cpu, pydicom 3), then MONAI Label's own requirements *without* the ones that cannot
# work here (torchvision breaks beside the CPU torch; sam2, numpymaxflow, itk and mlflow are only for MONAI
# Label's sample apps), then monailabel and pydicom-seg without their dependency pins (their pins would
# downgrade numpy, jsonschema and pydicom and pull a CUDA torch).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${MEDSIM_LABEL_VENV:-$here/.venv}"
step() { echo "[monailabel install] $*" >&2; }

MEDSIM_VENV="$venv" bash "$root/scripts/install.sh"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
step "4/5 installing MONAI Label's server requirements (without torchvision, sam2, numpymaxflow, mlflow; itk-io only)"
"${pip[@]}" install -c "$root/constraints.txt" -r "$here/requirements.txt" 2> >(grep -v 'is ignored' >&2)
step "5/5 installing monailabel 0.8.5 and pydicom-seg without their pins"
"${pip[@]}" install --no-deps "monailabel==0.8.5" "pydicom-seg==0.4.1" 2> >(grep -v 'is ignored' >&2)
# pydicom-seg 0.4.1 (imported by MONAI Label at start-up) still imports pydicom 2's module of storage UIDs;
# pydicom 3 keeps them in pydicom.uid. A one-line module of re-exports, in this environment only.
site="$("$venv/bin/python" -c "import pydicom, os; print(os.path.dirname(pydicom.__file__))")"
cp "$here/compat/_storage_sopclass_uids.py" "$site/_storage_sopclass_uids.py"
"$venv/bin/python" -c "import monailabel, monailabel.datastore.utils.convert, medsim.deploy.assist; print('monailabel', monailabel.__version__)" >&2
step "done: serve with  bash deploy/monailabel/serve.sh STUDIES_FOLDER --conf export EXPORT_DIR --conf index INDEX_DIR"
