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

ensure_uv() {
    command -v uv >/dev/null 2>&1 && return 0
    [ -x "$ROOT/.cache/bin/uv" ] && { export PATH="$ROOT/.cache/bin:$PATH"; return 0; }
    log "installing uv"
    if ! python3 -m pip --version >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip >/dev/null
    fi
    python3 -m pip install -q uv 2>/dev/null && command -v uv >/dev/null 2>&1 && return 0
    # A Debian system Python refuses pip installs (PEP 668, "externally managed"):
    # take the uv binary out of its wheel instead, into .cache/bin, touching nothing else.
    local wheels="$ROOT/.cache/uv-wheel"
    rm -rf "$wheels"
    python3 -m pip download -q --no-deps --only-binary :all: -d "$wheels" uv
    mkdir -p "$ROOT/.cache/bin"
    python3 - "$wheels" "$ROOT/.cache/bin/uv" <<'PY'
import glob, os, shutil, sys, zipfile
wheel = glob.glob(os.path.join(sys.argv[1], "uv-*.whl"))[0]
with zipfile.ZipFile(wheel) as zf:
    member = next(n for n in zf.namelist() if n.endswith("/scripts/uv"))
    with zf.open(member) as src, open(sys.argv[2], "wb") as dst:
        shutil.copyfileobj(src, dst)
os.chmod(sys.argv[2], 0o755)
PY
    export PATH="$ROOT/.cache/bin:$PATH"
}

ensure_python_env() {
    ensure_uv
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
