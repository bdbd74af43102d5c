#!/usr/bin/env bash
# Build the bids_roimae image and run it the way an HPC site or CBRAIN would: as an
# arbitrary non-root UID, read-only root file system, /tmp as tmpfs, no network.
#
# Usage: scripts/container-smoke.sh [--build-only | --no-build]
#
# Environment (all optional):
#   IMAGE            tag to build and run              (bids_roimae:smoke)
#   BASE_IMAGE       build arg; default localhost/bookworm-python when that image exists
#                    (scripts/make-base-image.sh), else python:3.11-slim
#   TORCH_VARIANT    build arg (cpu)
#   TORCH_SPEC       build arg (torch==2.13.0)
#   PIP_INDEX_ARGS   build arg; default "--index-url https://pypi.org/simple" so that
#                    machines reaching only PyPI can build
#   OFFLINE_WHEELS   folder of wheels to offer pip at build time; with the default
#                    PIP_INDEX_ARGS (PyPI) and TORCH_VARIANT=cpu it must hold a CPU torch
#                    wheel (torch-*+cpu-*.whl), else the build stops at once (PyPI's Linux
#                    torch is the CUDA build)
#   REF_DATA         folder with tpl-MNI152NLin2009cAsym/ and aal3/ (see docs/containers.md):
#                    the image is built offline with RESOURCES=copy from it
#   RESOURCES        fetch: download template and atlas at build time instead (internet);
#                    one of REF_DATA or RESOURCES=fetch must be given, nothing is
#                    downloaded unless asked for
#   SMOKE_DIR        where the example dataset and outputs go (a new temporary folder)
#   N_SUBJECTS       size of the example dataset (4; finetune uses 2 folds)
#   RUN_UID          UID:GID the container runs as (12345:12345)
#   SMOKE_FIDELITY   1: predict also computes region fidelity maps, which on a CPU costs
#                    tens of minutes per subject at the real grid (default 0: --no-fidelity)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

build=1
run=1
case "${1:-}" in
    --build-only) run=0 ;;
    --no-build) build=0 ;;
    "") ;;
    *) echo "usage: $0 [--build-only | --no-build]" >&2; exit 64 ;;
esac

IMAGE=${IMAGE:-bids_roimae:smoke}
TORCH_VARIANT=${TORCH_VARIANT:-cpu}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PIP_INDEX_ARGS=${PIP_INDEX_ARGS---index-url https://pypi.org/simple}
REF_DATA=${REF_DATA:-}
RESOURCES=${RESOURCES:-}
N_SUBJECTS=${N_SUBJECTS:-4}
RUN_UID=${RUN_UID:-12345:12345}

# Inputs first: fail in seconds, before any engine work.
if [ "$build" = 1 ]; then
    if [ -n "$REF_DATA" ]; then
        if [ ! -d "$REF_DATA/tpl-MNI152NLin2009cAsym" ] || [ ! -d "$REF_DATA/aal3" ]; then
            echo "container-smoke: REF_DATA=$REF_DATA lacks tpl-MNI152NLin2009cAsym/ or aal3/" >&2
            exit 66
        fi
        [ -z "$RESOURCES" ] || [ "$RESOURCES" = copy ] || {
            echo "container-smoke: REF_DATA is given, so RESOURCES must be copy" >&2; exit 64; }
        RESOURCES=copy
    elif [ "$RESOURCES" != fetch ]; then
        echo "container-smoke: set REF_DATA=<folder with tpl-MNI152NLin2009cAsym/ and aal3/>" \
             "to build offline, or RESOURCES=fetch to download them at build time" >&2
        exit 64
    fi
fi

if command -v podman >/dev/null 2>&1; then
    engine=podman
    # runc and explicit limits: the default runtime and inherited rlimits fail inside
    # some sandboxes and nested containers; harmless elsewhere.
    engine_args=(--runtime runc --ulimit nofile=20000:20000 --ulimit nproc=32768:32768)
    # pip inside the build verifies TLS against the host's CA bundle (site proxies).
    build_args=(-v /etc/ssl/certs:/etc/ssl/certs:ro)
elif command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    engine=docker
    engine_args=()
    build_args=()
else
    echo "container-smoke: no podman, and no docker with a running daemon" >&2
    exit 1
fi

if [ -z "${BASE_IMAGE:-}" ]; then
    if "$engine" image exists localhost/bookworm-python 2>/dev/null \
       || "$engine" image inspect localhost/bookworm-python >/dev/null 2>&1; then
        BASE_IMAGE=localhost/bookworm-python
    else
        BASE_IMAGE=python:3.11-slim
    fi
fi

step() { printf '\n=== %s\n' "$*"; }

# --- build context: optional offline material in build/offline/ (git-ignored) -----------
offline=$repo/build/offline
# build/offline/ holds copies of licensed data (AAL3): never leave it behind
cleanup_offline() { rm -rf "$offline"; }

stage_offline() {
    rm -rf "$offline"
    mkdir -p "$offline"
    if [ -n "${OFFLINE_WHEELS:-}" ]; then
        mkdir -p "$offline/wheels"
        cp -l "$OFFLINE_WHEELS"/*.whl "$offline/wheels/" 2>/dev/null \
            || cp "$OFFLINE_WHEELS"/*.whl "$offline/wheels/"
    fi
    if [ "$RESOURCES" = copy ]; then
        # The layouts the libraries cache them in, so the app's own fetch code finds them.
        local tpl=$offline/templateflow/tpl-MNI152NLin2009cAsym
        local aal=$offline/nilearn_data/aal_3v2/AAL3
        mkdir -p "$tpl" "$aal"
        cp "$REF_DATA"/tpl-MNI152NLin2009cAsym/* "$tpl/"
        gunzip -c "$REF_DATA/aal3/AAL3v1.nii.gz" > "$aal/AAL3v1.nii"
        cp "$REF_DATA/aal3/AAL3v1.xml" "$aal/"
    fi
}

if [ "$build" = 1 ]; then
    step "build $IMAGE with $engine (base $BASE_IMAGE, torch $TORCH_SPEC)"
    trap cleanup_offline EXIT
    stage_offline
    version=$(sed -n 's/^version *= *"\(.*\)"/\1/p' pyproject.toml)
    start=$(date +%s)
    "$engine" build "${engine_args[@]}" "${build_args[@]}" \
        --build-arg BASE_IMAGE="$BASE_IMAGE" \
        --build-arg TORCH_VARIANT="$TORCH_VARIANT" \
        --build-arg TORCH_SPEC="$TORCH_SPEC" \
        --build-arg PIP_INDEX_ARGS="$PIP_INDEX_ARGS" \
        --build-arg RESOURCES="$RESOURCES" \
        --build-arg VERSION="$version" \
        --build-arg IMAGE_TAG="$IMAGE" \
        -t "$IMAGE" .
    cleanup_offline
    trap - EXIT
    echo "build took $(( $(date +%s) - start )) s"
    "$engine" image inspect --format '{{.Size}}' "$IMAGE" \
        | awk '{printf "image size: %.0f MB\n", $1 / 1e6}'
fi
[ "$run" = 1 ] || exit 0

# --- runs --------------------------------------------------------------------------------
smoke=${SMOKE_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/bids_roimae_smoke.XXXXXX")}
mkdir -p "$smoke/data" "$smoke/out"
# The container user owns nothing on the host: give it the output folders.
chown -R "$RUN_UID" "$smoke/data" "$smoke/out" 2>/dev/null || chmod -R a+rwX "$smoke"

# --init: an init process as PID 1 forwards SIGTERM (docker/podman stop) to the app.
secure=(--rm --init --read-only --tmpfs /tmp --user "$RUN_UID" --network none)
run_app() {  # run_app [engine options...] -- [app arguments...]
    local opts=()
    while [ "$1" != "--" ]; do opts+=("$1"); shift; done
    shift
    local start=$(date +%s) rc=0
    "$engine" run "${engine_args[@]}" "${secure[@]}" "${opts[@]}" "$IMAGE" "$@" || rc=$?
    echo "exit code $rc after $(( $(date +%s) - start )) s"
    return $rc
}

step "--version"
run_app -- --version | tee "$smoke/version.txt"
grep -q '^bids_roimae ' "$smoke/version.txt"

step "example dataset ($N_SUBJECTS subjects) with bids_roimae-synth"
run_app -v "$smoke/data:/synth" --entrypoint bids_roimae-synth -- \
    /synth/ds --n-subjects "$N_SUBJECTS"

mounts=(-v "$smoke/data/ds:/data:ro" -v "$smoke/out:/out")

step "participant --mode prepare"
run_app "${mounts[@]}" -- /data /out participant --mode prepare

step "group (pretrain, tiny preset)"
run_app "${mounts[@]}" -- /data /out group --model-preset tiny --steps 4 --batch-size 2

step "participant --mode finetune (dx: ADHD 1-3 vs control 0)"
run_app "${mounts[@]}" -- /data /out participant --mode finetune --target dx \
    --positive 1 2 3 --folds 2

step "participant --mode predict (sub-01)"
fidelity=--no-fidelity
[ "${SMOKE_FIDELITY:-0}" = 1 ] && fidelity=--fidelity
run_app "${mounts[@]}" -- /data /out participant --mode predict --participant-label 01 \
    --ig-steps 4 "$fidelity"

step "outputs"
find "$smoke/out" -maxdepth 4 -not -path '*/cache/*' | sort | head -60
test -f "$smoke/out/dataset_description.json"
python3 - "$smoke/out/dataset_description.json" <<'EOF'
import json, sys
desc = json.load(open(sys.argv[1]))
print("GeneratedBy:", json.dumps(desc.get("GeneratedBy"), indent=None))
EOF
echo "container-smoke: OK ($smoke)"
