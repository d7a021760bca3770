#!/usr/bin/env bash
# Start MONAI Label with medsim's app on this machine only (127.0.0.1) unless --public is given.
#   bash deploy/monailabel/serve.sh STUDIES --conf export EXPORT_DIR --conf index INDEX_DIR [--conf run RUN_DIR]
#        [--port 8000] [--public] [other `monailabel start_server` options]
# STUDIES: a folder of images (MONAI Label's local datastore; it writes labels/ and datastore_v2.json there).
# The environment is deploy/monailabel/.venv (bash deploy/monailabel/install.sh), or MEDSIM_LABEL_VENV.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${MEDSIM_LABEL_VENV:-$here/.venv}"
if [[ $# -lt 1 || "$1" == -* ]]; then
  echo "usage: bash deploy/monailabel/serve.sh STUDIES --conf export EXPORT_DIR --conf index INDEX_DIR [--port N] [--public]" >&2
  exit 2
fi
studies="$1"; shift
if [[ ! -d "$studies" ]]; then
  echo "serve.sh: studies folder '$studies' does not exist" >&2; exit 2
fi
if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c "import monailabel" 2>/dev/null; then
  echo "serve.sh: no MONAI Label environment at $venv; run: bash deploy/monailabel/install.sh" >&2; exit 2
fi
host="127.0.0.1"
args=()
export_dir=""; index_dir=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --public) host="0.0.0.0"; shift ;;
    --conf)
      [[ $# -ge 3 ]] || { echo "serve.sh: --conf needs NAME VALUE" >&2; exit 2; }
      [[ "$2" == "export" ]] && export_dir="$3"
      [[ "$2" == "index" ]] && index_dir="$3"
      args+=("$1" "$2" "$3"); shift 3 ;;
    --host|-i) echo "serve.sh: use --public to listen beyond this machine (binds 0.0.0.0)" >&2; exit 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
# the export and index, checked before the server starts: one line saying what is wrong, exit code 2
"$venv/bin/python" -c 'import sys; from medsim.deploy.assist import preflight; sys.exit(preflight(*sys.argv[1:]))' \
  "$export_dir" "$index_dir"
[[ "$host" == "0.0.0.0" ]] && echo "serve.sh: listening on every interface (--public): anyone who reaches this port can read the studies" >&2
# the venv's python, first on PATH too: MONAI Label starts training in a subprocess of its own interpreter
export PATH="$venv/bin:$PATH"
exec "$venv/bin/python" -m monailabel.main start_server --app "$here" --studies "$studies" --host "$host" "${args[@]}"
