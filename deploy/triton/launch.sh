#!/usr/bin/env bash
# Serve a Triton model repository written by `medsim export RUN --out OUT --triton` (OUT/triton).
#
#   deploy/triton/launch.sh [--cpu] [--public] [--dry-run] [--tag TAG] [--http-port N] [--grpc-port N]
#                           [--metrics-port N] MODEL_REPOSITORY
#
# Runs a local `tritonserver` when one is on PATH, else the NGC image nvcr.io/nvidia/tritonserver:<TAG>-py3 with
# docker. HTTP, gRPC and metrics listen on 127.0.0.1 only unless --public is given (then on every interface: put
# authentication in front of it first, Triton has none). --cpu starts the container without --gpus (the models
# must be exported with --triton-kind cpu). --dry-run prints the command instead of running it.
# MODEL_REPOSITORY may also be the export folder OUT itself (its triton/ is used).
set -euo pipefail

usage() { sed -n '4,5p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
die() { echo "launch.sh: $*" >&2; exit 2; }

tag="${MEDSIM_TRITON_TAG:-24.08}"
cpu=0 public=0 dry=0 http=8000 grpc=8001 metrics=8002 repo=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) cpu=1 ;;
    --public) public=1 ;;
    --dry-run) dry=1 ;;
    --tag) [ $# -ge 2 ] || usage; tag="$2"; shift ;;
    --http-port) [ $# -ge 2 ] || usage; http="$2"; shift ;;
    --grpc-port) [ $# -ge 2 ] || usage; grpc="$2"; shift ;;
    --metrics-port) [ $# -ge 2 ] || usage; metrics="$2"; shift ;;
    -h|--help) usage ;;
    -*) die "unknown option '$1' (see --help)" ;;
    *) [ -z "$repo" ] || die "one MODEL_REPOSITORY, got '$repo' and '$1'"; repo="$1" ;;
  esac
  shift
done
[ -n "$repo" ] || usage
for port in "$http" "$grpc" "$metrics"; do
  [[ "$port" =~ ^[0-9]+$ ]] && [ "$port" -ge 1 ] && [ "$port" -le 65535 ] || die "port '$port' is not in 1..65535"
done

[ -d "$repo" ] || die "$repo: not a folder (give the Triton model repository, OUT/triton of medsim export --triton)"
repo="$(cd "$repo" && pwd)"
if ! compgen -G "$repo/*/config.pbtxt" >/dev/null && compgen -G "$repo/triton/*/config.pbtxt" >/dev/null; then
  repo="$repo/triton"  # the export folder was given
fi
compgen -G "$repo/*/config.pbtxt" >/dev/null \
  || die "$repo: no MODEL/config.pbtxt in it; write one with: medsim export RUN --out OUT --triton (then serve OUT/triton)"
if [ "$cpu" = 1 ] && grep -l 'kind: KIND_GPU' "$repo"/*/config.pbtxt >/dev/null 2>&1; then
  echo "launch.sh: warning: --cpu, but $(grep -l 'kind: KIND_GPU' "$repo"/*/config.pbtxt | xargs -n1 dirname \
    | xargs -n1 basename | paste -sd, -) ask for a GPU; re-export with --triton-kind cpu" >&2
fi

if [ "$public" = 1 ]; then addr=0.0.0.0; else addr=127.0.0.1; fi
if command -v tritonserver >/dev/null 2>&1; then
  cmd=("$(command -v tritonserver)" "--model-repository=$repo" "--http-address=$addr" "--grpc-address=$addr"
       "--http-port=$http" "--grpc-port=$grpc" "--metrics-port=$metrics")
elif command -v docker >/dev/null 2>&1; then
  # inside the container the server listens on all interfaces; the published ports decide who can reach it
  if [ "$public" = 1 ]; then bind=""; else bind="127.0.0.1:"; fi
  cmd=(docker run --rm --shm-size=1g)
  [ "$cpu" = 1 ] || cmd+=(--gpus=all)
  cmd+=(-p "${bind}${http}:8000" -p "${bind}${grpc}:8001" -p "${bind}${metrics}:8002" -v "$repo:/models:ro"
        "nvcr.io/nvidia/tritonserver:${tag}-py3" tritonserver --model-repository=/models)
else
  die "neither a 'tritonserver' binary nor 'docker' is on PATH: install Docker (plus the NVIDIA Container Toolkit for GPUs) to run nvcr.io/nvidia/tritonserver:${tag}-py3, or run inside that image"
fi

if [ "$dry" = 1 ]; then
  printf '%q ' "${cmd[@]}" | sed 's/ $//'
  echo
  exit 0
fi
exec "${cmd[@]}"
