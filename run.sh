#!/usr/bin/env bash
# One entry point for a fresh Debian machine (Python 3.11, root):
#   ./run.sh quickstart   - set up everything, then run the main job end to end
#   ./run.sh test         - set up everything, then lint, type-check and run all tests
# Set-up is idempotent: system packages, the locked Python environment (uv.lock),
# and a Docker engine (started here when none is running) are brought in as needed.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
export SSL_CERT_FILE=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}

log() { printf '==> %s\n' "$*" >&2; }

ensure_apt_packages() {
    local missing=()
    command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
    if [ "${1:-}" = full ]; then
        command -v dockerd >/dev/null 2>&1 || [ -x /usr/sbin/dockerd ] || missing+=(docker.io)
        command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || missing+=(debootstrap)
        command -v iptables >/dev/null 2>&1 || [ -x /usr/sbin/iptables ] || missing+=(iptables)
        command -v curl >/dev/null 2>&1 || missing+=(curl)  # scoring tests: curl --http2, curl -F
    fi
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        log "missing system packages: ${missing[*]} (install them with your package manager)"
        return 0
    fi
    log "installing system packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

ensure_python_env() {
    if ! command -v uv >/dev/null 2>&1; then
        log "installing uv"
        python3 -m pip install -q uv
    fi
    uv sync --frozen --quiet
    export PATH="$ROOT/.venv/bin:/usr/sbin:$PATH"
}

ensure_docker_engine() {
    command -v dockerd >/dev/null 2>&1 || [ -x /usr/sbin/dockerd ] || return 0
    if docker info >/dev/null 2>&1; then return 0; fi
    log "starting dockerd (log: /var/log/modelfleet-dockerd.log)"
    nohup /usr/sbin/dockerd >/var/log/modelfleet-dockerd.log 2>&1 &
    for _ in $(seq 1 120); do
        docker info >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    log "dockerd did not come up; see /var/log/modelfleet-dockerd.log"
    return 1
}

cmd=${1:-}
shift || true
case "$cmd" in
    quickstart)
        ensure_apt_packages
        ensure_python_env
        exec modelfleet quickstart "$@"
        ;;
    test)
        ensure_apt_packages full
        ensure_python_env
        ensure_docker_engine
        log "ruff"
        ruff check packages tests benchmarks hil
        log "mypy --strict"
        mypy packages/scoring/src packages/agent/src packages/deployer/src
        log "pytest"
        exec pytest "$@"
        ;;
    *)
        echo "usage: ./run.sh quickstart|test [args...]" >&2
        exit 2
        ;;
esac
