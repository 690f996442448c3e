#!/usr/bin/env bash
# A private, throw-away Docker engine for building and running this project's images where no image
# registry is reachable (CI, and tests/deploy/test_local_engine.py). Linux, as root.
#
#   deploy/local-engine.sh check             # can an engine run here? exit 0, or 3 and the reason
#   deploy/local-engine.sh start             # start one; prints its state folder (STATE) last
#   deploy/local-engine.sh bases STATE       # build the local base images that are not cached yet
#   deploy/local-engine.sh stop STATE        # remove its containers, stop it, remove STATE
#   deploy/local-engine.sh run -- CMD ...    # start + bases, CMD with DOCKER_HOST set, stop
#
# STATE/env holds DOCKER_HOST (the engine's socket), DOCKER (the client that goes with it) and the
# base image tags; source it. Exit status 3 means "no engine possible here" (not root, not Linux,
# Debian's docker.io or debootstrap package missing, dockerd would not start): the tests skip on it, or fail in CI.
#
# Isolation. The engine has its own socket, exec root and pid file under STATE (a fresh temporary
# folder) and its own data root; it never talks to another engine. It is started with
# --bridge=none --iptables=false --ip6tables=false --ip-masq=false --ip-forward=false: no bridge,
# no NAT, no iptables rule, no sysctl change. Containers must use host networking; everything
# listens on 127.0.0.1. The engine stops by itself after DCLGAN_ENGINE_MAX_S (default 3600 s) even
# if nobody calls stop.
#
# Cache. The data root (DCLGAN_ENGINE_DATA, default /var/cache/dclgan-engine) is kept between runs,
# so base images (by tag) and BuildKit's layer cache survive; only one engine uses it at a time (a
# lock, waited for up to DCLGAN_ENGINE_LOCK_WAIT_S, default 600 s). Base images, all local:
#   dclgan-local/debian-python:<codename>-r<N>  Debian minbase + python3, python3-venv and
#       ca-certificates, made with debootstrap from the Debian mirror apt already uses (read from
#       apt's configuration at run time) and `docker import`. No CA bundle of this machine in it:
#       pip gets that as a build secret (see the Dockerfile), which no layer keeps.
#   dclgan-local/prometheus:<codename>-r<N>    that base + Debian's prometheus (and wget for the
#       compose healthcheck), deploy/local-engine/prometheus.Dockerfile.
set -euo pipefail

RECIPE=1  # bump when the base recipe changes: new tags, so cached images of the old recipe are not used
DATA=${DCLGAN_ENGINE_DATA:-/var/cache/dclgan-engine}
MAX_S=${DCLGAN_ENGINE_MAX_S:-3600}
LOCK_WAIT_S=${DCLGAN_ENGINE_LOCK_WAIT_S:-600}
START_WAIT_S=60
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

say() { printf 'local-engine: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }
unavailable() { say "unavailable: $*"; exit 3; }
usage() { sed -n '5,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }

# shellcheck disable=SC1091 # the host's own file
codename() { (. /etc/os-release && printf '%s' "${VERSION_CODENAME:-}"); }

# --- check ----------------------------------------------------------------------------------------
cmd_check() {
    [ "$(uname -s)" = Linux ] || unavailable "not Linux ($(uname -s))"
    [ "$(id -u)" = 0 ] || unavailable "dockerd needs root (running as uid $(id -u))"
    local os_id
    # shellcheck disable=SC1091 # the host's own file
    os_id=$(. /etc/os-release && printf '%s' "${ID:-}")
    [ "$os_id" = debian ] || unavailable "the local base images are made with debootstrap from Debian's mirror: this host is '$os_id', not Debian"
    [ -n "$(codename)" ] || unavailable "no VERSION_CODENAME in /etc/os-release"
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    local tool
    for tool in flock setsid timeout tar; do
        command -v "$tool" >/dev/null || missing+=("$tool")
    done
    [ ${#missing[@]} -eq 0 ] || unavailable "missing: ${missing[*]} (Debian: apt-get install ${missing[*]})"
    [ -n "$(client)" ] || unavailable "no docker client that builds with BuildKit (Debian's docker.io has one; newer clients need the buildx plugin)"
    grep -qw overlay /proc/filesystems || modprobe overlay 2>/dev/null \
        || unavailable "the kernel has no overlay filesystem (dockerd's overlay2 storage driver)"
    [ -d /sys/fs/cgroup ] || unavailable "no cgroup filesystem at /sys/fs/cgroup"
}

# A client that builds with BuildKit: one with the buildx plugin, or one older than 23.0 (Debian's
# 20.10 has BuildKit built in). A newer client without buildx refuses DOCKER_BUILDKIT=1, and its
# legacy builder would build every stage of the Dockerfile, the unreachable CUDA base included.
client() {
    local c version
    for c in "$(dirname "$(command -v dockerd)")/docker" /usr/bin/docker "$(command -v docker || true)"; do
        [ -x "$c" ] || continue
        if "$c" buildx version >/dev/null 2>&1; then printf '%s' "$c"; return; fi
        version=$("$c" --version 2>/dev/null | sed -n 's/^Docker version \([0-9]*\)\..*/\1/p')
        if [ -n "$version" ] && [ "$version" -lt 23 ]; then printf '%s' "$c"; return; fi
    done
}

# --- start ----------------------------------------------------------------------------------------
cmd_start() {
    cmd_check
    mkdir -p "$DATA"
    local state
    # Short on purpose: containerd's sockets live under it, and socket paths are limited to 108 bytes.
    state=$(mktemp -d /tmp/dclgan-engine.XXXXXX)
    printf '{}\n' >"$state/daemon.json"  # ignore /etc/docker/daemon.json: no setting of another engine
    local socket="$state/docker.sock"
    # flock holds the data root for the engine's whole life; timeout bounds that life; setsid keeps
    # the engine out of the caller's process group (a Ctrl+C there must not kill it half-way).
    setsid -w flock -E 75 -w "$LOCK_WAIT_S" "$DATA/.lock" \
        timeout --kill-after=30 "$MAX_S" \
        dockerd \
        --data-root "$DATA" \
        --exec-root "$state/exec" \
        --pidfile "$state/dockerd.pid" \
        --host "unix://$socket" \
        --config-file "$state/daemon.json" \
        --bridge=none --iptables=false --ip6tables=false --ip-masq=false --ip-forward=false \
        --log-level=warn \
        </dev/null >"$state/dockerd.log" 2>&1 &
    local wrapper=$!
    printf '%s\n' "$wrapper" >"$state/wrapper.pid"
    cat >"$state/env" <<EOF
DOCKER_HOST=unix://$socket
DOCKER=$(client)
DCLGAN_BASE_IMAGE=dclgan-local/debian-python:$(codename)-r$RECIPE
DCLGAN_PROMETHEUS_IMAGE=dclgan-local/prometheus:$(codename)-r$RECIPE
EOF
    local waited=0 limit=$((START_WAIT_S + LOCK_WAIT_S))
    until DOCKER_HOST="unix://$socket" "$(client)" info >/dev/null 2>&1; do
        if ! kill -0 "$wrapper" 2>/dev/null; then
            local rc=0 log
            wait "$wrapper" || rc=$?
            log=$(tail -n 15 "$state/dockerd.log")
            rm -rf "$state"
            [ "$rc" != 75 ] || die "another engine has held $DATA for over $LOCK_WAIT_S s"
            unavailable "dockerd did not start (status $rc); its last words: $log"
        fi
        [ "$waited" -lt "$((limit * 2))" ] || { cmd_stop "$state"; die "dockerd did not answer within $limit s"; }
        sleep 0.5
        waited=$((waited + 1))
    done
    # Containers left by a run that was killed: none may come back (restart policies) or hold ports.
    local leftover
    leftover=$(DOCKER_HOST="unix://$socket" timeout 60 "$(client)" ps -aq)
    if [ -n "$leftover" ]; then
        say "removing containers left over by an earlier run"
        # shellcheck disable=SC2086 # one id per word
        DOCKER_HOST="unix://$socket" timeout 120 "$(client)" rm -f $leftover >/dev/null
    fi
    say "engine up in $((waited / 2)) s: DOCKER_HOST=unix://$socket, data root $DATA, stops by itself after $MAX_S s"
    printf '%s\n' "$state"
}

# --- stop -----------------------------------------------------------------------------------------
state_arg() {
    [ $# -eq 1 ] || usage
    [ -f "$1/env" ] || die "$1 is not a state folder of this script (no env file)"
    cd "$1" && pwd
}

alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

cmd_stop() {
    local state
    state=$(state_arg "$@")
    local socket="$state/docker.sock" docker
    docker=$(sed -n 's/^DOCKER=//p' "$state/env")
    local dockerd_pid="" containerd_pid="" wrapper_pid
    wrapper_pid=$(cat "$state/wrapper.pid" 2>/dev/null || true)
    dockerd_pid=$(cat "$state/dockerd.pid" 2>/dev/null || true)
    containerd_pid=$(cat "$state/exec/containerd/containerd.pid" 2>/dev/null || true)
    if [ -S "$socket" ] && alive "$dockerd_pid"; then
        local ids
        ids=$(DOCKER_HOST="unix://$socket" timeout 30 "$docker" ps -aq 2>/dev/null || true)
        if [ -n "$ids" ]; then
            # shellcheck disable=SC2086 # one id per word
            DOCKER_HOST="unix://$socket" timeout 120 "$docker" rm -f $ids >/dev/null 2>&1 || true
        fi
        # Keep the cache bounded: dangling images of earlier builds, build cache older than a week.
        DOCKER_HOST="unix://$socket" timeout 120 "$docker" image prune -f >/dev/null 2>&1 || true
        DOCKER_HOST="unix://$socket" timeout 120 "$docker" builder prune -f --filter until=168h >/dev/null 2>&1 || true
    fi
    local pid
    for pid in "$dockerd_pid" "$containerd_pid"; do
        if alive "$pid"; then kill -TERM "$pid" 2>/dev/null || true; fi
    done
    local i
    for i in $(seq 60); do
        alive "$dockerd_pid" || alive "$containerd_pid" || alive "$wrapper_pid" || break
        sleep 0.5
    done
    for pid in "$dockerd_pid" "$containerd_pid" "$wrapper_pid"; do
        if alive "$pid"; then
            say "pid $pid did not stop within 30 s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    # Anything the engine mounted under its exec root (it should have unmounted it all itself).
    local mount
    awk -v p="$state/" 'index($2, p) == 1 {print $2}' /proc/self/mounts | sort -r | while read -r mount; do
        umount -l "$mount" 2>/dev/null || true
    done
    rm -rf "$state"
    say "engine stopped ($i half-seconds)"
}

# --- bases ----------------------------------------------------------------------------------------
debian_mirror() {
    local release=$1 uri
    # apt's own view of its sources (one-line and deb822 formats alike); needs `apt-get update` once.
    # shellcheck disable=SC2016 # apt's format placeholders, not shell expansions
    uri=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 'Created-By: Packages' 2>/dev/null \
        | awk -v r="$release" '$2 == r {print $1; exit}')
    if [ -z "$uri" ]; then
        # No package lists yet: read the sources themselves (deb822 stanzas, then one-line entries).
        uri=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk -v r="$release" '
            /^$/ { if (uris != "" && suites ~ ("(^| )" r "( |$)")) { split(uris, u, " "); print u[1]; exit } uris = suites = "" }
            /^URIs:/ { sub(/^URIs:[ \t]*/, ""); uris = $0 }
            /^Suites:/ { sub(/^Suites:[ \t]*/, ""); suites = $0 }
            END { if (uris != "" && suites ~ ("(^| )" r "( |$)")) { split(uris, u, " "); print u[1] } }' | head -n 1)
    fi
    if [ -z "$uri" ]; then
        uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
            | awk -v r="$release" '$1 == "deb" { i = 2; if ($i ~ /^\[/) while ($i !~ /\]$/) i++; if ($i ~ /\]$/ && $2 ~ /^\[/) i++; if ($(i + 1) == r) { print $i; exit } }')
    fi
    [ -n "$uri" ] || die "apt is configured with no '$release' repository to debootstrap from"
    printf '%s' "$uri"
}

cmd_bases() {
    local state
    state=$(state_arg "$@")
    local DOCKER DOCKER_HOST DCLGAN_BASE_IMAGE DCLGAN_PROMETHEUS_IMAGE
    # shellcheck disable=SC1091 # written by cmd_start
    . "$state/env"
    export DOCKER_HOST
    local release
    release=$(codename)
    if "$DOCKER" image inspect "$DCLGAN_BASE_IMAGE" >/dev/null 2>&1; then
        say "cached: $DCLGAN_BASE_IMAGE"
    else
        local rootfs="$state/rootfs" mirror started=$SECONDS
        mirror=$(debian_mirror "$release")
        say "building $DCLGAN_BASE_IMAGE: debootstrap $release from apt's mirror"
        timeout 900 debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            "$release" "$rootfs" "$mirror" >"$state/debootstrap.log" 2>&1 \
            || { tail -n 20 "$state/debootstrap.log" >&2; die "debootstrap failed (log above)"; }
        # What an image does not need: downloaded packages, package lists, documentation, locales.
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
            "$rootfs"/usr/share/doc "$rootfs"/usr/share/man "$rootfs"/usr/share/locale
        tar -C "$rootfs" --numeric-owner -c . | timeout 300 "$DOCKER" import \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'ENV LANG=C.UTF-8' \
            --change 'CMD ["bash"]' \
            - "$DCLGAN_BASE_IMAGE" >/dev/null
        rm -rf "$rootfs"
        say "built $DCLGAN_BASE_IMAGE in $((SECONDS - started)) s"
    fi
    if "$DOCKER" image inspect "$DCLGAN_PROMETHEUS_IMAGE" >/dev/null 2>&1; then
        say "cached: $DCLGAN_PROMETHEUS_IMAGE"
    else
        local started=$SECONDS
        say "building $DCLGAN_PROMETHEUS_IMAGE (Debian's prometheus)"
        DOCKER_BUILDKIT=1 timeout 900 "$DOCKER" build --network host --progress plain \
            --build-arg "BASE=$DCLGAN_BASE_IMAGE" \
            -f "$HERE/local-engine/prometheus.Dockerfile" -t "$DCLGAN_PROMETHEUS_IMAGE" \
            "$HERE/local-engine" >"$state/prometheus-build.log" 2>&1 \
            || { tail -n 30 "$state/prometheus-build.log" >&2; die "building the Prometheus image failed (log above)"; }
        say "built $DCLGAN_PROMETHEUS_IMAGE in $((SECONDS - started)) s"
    fi
}

# --- run ------------------------------------------------------------------------------------------
cmd_run() {
    [ "${1:-}" = -- ] && shift
    [ $# -gt 0 ] || usage
    local state
    state=$(cmd_start)
    # shellcheck disable=SC2064 # expand now: the folder is known
    trap "'${BASH_SOURCE[0]}' stop '$state'" EXIT
    cmd_bases "$state"
    (
        set -a
        # shellcheck disable=SC1091
        . "$state/env"
        "$@"
    )
}

case "${1:-}" in
    check) shift; [ $# -eq 0 ] || usage; cmd_check; say "an engine can run here" ;;
    start) shift; [ $# -eq 0 ] || usage; cmd_start ;;
    bases) shift; cmd_bases "$@" ;;
    stop) shift; cmd_stop "$@" ;;
    run) shift; cmd_run "$@" ;;
    *) usage ;;
esac
