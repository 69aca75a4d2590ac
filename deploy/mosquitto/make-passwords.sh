#!/usr/bin/env bash
# Make a mosquitto password file for the controller and a list of devices.
#   ./make-passwords.sh OUT_FILE controller-password dev-1 dev-2 ...
# Each device gets a random password, printed once as "device<TAB>password"
# for provisioning (put it in that device's agent config); only the hashes
# are stored in OUT_FILE.
set -euo pipefail
out=${1:?usage: make-passwords.sh OUT_FILE CONTROLLER_PASSWORD DEVICE...}
controller_password=${2:?controller password missing}
shift 2
umask 077
: >"$out"
mosquitto_passwd -b "$out" modelfleet-controller "$controller_password"
for device in "$@"; do
    case "$device" in
        *[!A-Za-z0-9._:-]* | "" ) echo "invalid device id: $device" >&2; exit 2 ;;
    esac
    password=$(head -c 18 /dev/urandom | base64 | tr -d '/+=')
    mosquitto_passwd -b "$out" "$device" "$password"
    printf '%s\t%s\n' "$device" "$password"
done
