#!/usr/bin/env bash
# Build the CPU image and run the demo inside it: no network, a non-root uid, a read-only root
# filesystem. Prints the image size, the version inside and the demo's time.
#
#   scripts/container-smoke.sh            # docker if its engine answers, else podman
#   ENGINE=podman scripts/container-smoke.sh
#
# Environment:
#   ENGINE       docker or podman (default: docker when `docker info` works, else podman)
#   IMAGE        tag to build (default bids_anomaly:cpu-smoke)
#   BASE_IMAGE   base of both stages. Default with docker: the Dockerfile's (debian:bookworm-
#                slim from the registry). Default with podman: a local Debian bookworm made by
#                debootstrap and imported with `podman import`, for machines without a registry.
#   WHEELHOUSE   1: fill wheelhouse/ on the host (pip wheel) and build with --no-index, for
#                build containers that cannot reach the package index. Default: 1 with podman,
#                0 with docker.
#   MIRROR       Debian mirror for debootstrap (default http://deb.debian.org/debian)
#   OUT          where the demo writes (default: a new temporary folder)
#   NO_CACHE     1: build every layer again (default 0)
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${ENGINE:-}" ]]; then
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then ENGINE=docker; else ENGINE=podman; fi
fi
IMAGE=${IMAGE:-bids_anomaly:cpu-smoke}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n 1)
log() { printf '[smoke] %s\n' "$*"; }

if [[ "$ENGINE" == podman ]]; then
    # podman without a container daemon: runc, cgroupfs, no default ulimits (the host's hard
    # limits may be lower than podman's defaults), events to a file
    if [[ -z "${CONTAINERS_CONF:-}" ]]; then
        CONTAINERS_CONF=$(mktemp --suffix=.conf)
        cat > "$CONTAINERS_CONF" <<'CONF'
[containers]
default_ulimits = []
[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
events_logger = "file"
CONF
        export CONTAINERS_CONF
    fi
    WHEELHOUSE=${WHEELHOUSE:-1}
    if [[ -z "${BASE_IMAGE:-}" ]]; then
        BASE_IMAGE=localhost/debian:bookworm-minbase
        if ! podman image exists "$BASE_IMAGE"; then
            log "building the base image $BASE_IMAGE with debootstrap from $MIRROR"
            rootfs=$(mktemp -d)
            debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >/dev/null
            tar -C "$rootfs" -c . | podman import - "$BASE_IMAGE" >/dev/null
            rm -rf "$rootfs"
        fi
    fi
fi
WHEELHOUSE=${WHEELHOUSE:-0}

build_args=(--build-arg "VERSION=$VERSION")
# podman writes OCI images by default, which drop HEALTHCHECK/SHELL; docker format keeps parity
[[ "$ENGINE" == podman ]] && build_args+=(--format docker)
[[ -n "${BASE_IMAGE:-}" ]] && build_args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
[[ "${NO_CACHE:-0}" == 1 ]] && build_args+=(--no-cache)
if [[ "$WHEELHOUSE" == 1 ]]; then
    log "filling wheelhouse/ with the pinned requirements (pip wheel on the host)"
    python3 -m pip wheel --quiet -r docker/requirements.txt -w wheelhouse \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
else
    find wheelhouse -name '*.whl' -delete
fi

log "building $IMAGE with $ENGINE (base ${BASE_IMAGE:-from the Dockerfile}, wheelhouse $WHEELHOUSE)"
start=$(date +%s)
build_log=$(mktemp --suffix=.log)
if ! "$ENGINE" build "${build_args[@]}" -t "$IMAGE" . > "$build_log" 2>&1; then
    tail -n 40 "$build_log"
    log "FAIL: the build failed; full log in $build_log"
    exit 1
fi
log "image built in $(( $(date +%s) - start )) s (log $build_log)"
size=$("$ENGINE" image inspect --format '{{.Size}}' "$IMAGE")
log "image size: $(( size / 1000000 )) MB"

inside=$("$ENGINE" run --rm --network none "$IMAGE" --version)
log "--version inside: $inside"
[[ "$inside" == "bids_anomaly $VERSION" ]] || { log "FAIL: expected bids_anomaly $VERSION"; exit 1; }
"$ENGINE" run --rm --network none "$IMAGE" --help >/dev/null
log "--help: ok"

OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
chmod 777 "$OUT"
uid=12345
log "demo in $OUT: --network none, --read-only, uid $uid"
start=$(date +%s)
"$ENGINE" run --rm --network none --read-only --tmpfs /tmp:rw,exec,size=4g -u "$uid:$uid" \
    -v "$OUT:/out" "$IMAGE" demo /out/demo --healthy 4 --patients 1 --nprocs 2 \
    | sed 's/^/[container] /'
seconds=$(( $(date +%s) - start ))
report=$OUT/demo/derivatives/bids_anomaly/group/report.html
[[ -s "$report" ]] || { log "FAIL: no report at $report"; exit 1; }
owner=$(stat -c %u "$report")
[[ "$owner" == "$uid" ]] || { log "FAIL: report owned by uid $owner, not $uid"; exit 1; }
log "demo passed in $seconds s inside the container; report $report (owner uid $owner)"
log "OK: $IMAGE ($(( size / 1000000 )) MB), bids_anomaly $VERSION"
