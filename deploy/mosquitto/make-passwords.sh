#!/usr/bin/env bash
# Make a mosquitto password file for the controller and a list of devices.
#   ./make-passwords.sh OUT_FILE controller-password dev-1 dev-2 ...
# Each device gets a random password, printed once as "device<TAB>password"
# for provisioning (put it in that device's agent config); only the hashes
# are stored in OUT_FILE. Every device id is checked before anything is
# written, and OUT_FILE is replaced only once the whole file is made.
set -euo pipefail
out=${1:?usage: make-passwords.sh OUT_FILE CONTROLLER_PASSWORD DEVICE...}
controller_password=${2:?controller password missing}
shift 2
for device in "$@"; do
    if [[ "$device" == modelfleet-controller ]]; then
        # the ACL gives this user every device's topics
        echo "modelfleet-controller is the controller's user name, not a device id" >&2
        exit 2
    fi
    # the agent's rule (modelfleet.agent.protocol.check_device_id): one topic level, no wildcards
    if ! [[ "$device" =~ ^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$ ]]; then
        echo "invalid device id: $device (use 1-128 letters, digits, '.', '_', ':' or '-', starting with a letter or digit)" >&2
        exit 2
    fi
done
umask 077
tmp=$(mktemp "$out.XXXXXX")
trap 'rm -f "$tmp"' EXIT
mosquitto_passwd -b "$tmp" modelfleet-controller "$controller_password"
for device in "$@"; do
    password=$(head -c 18 /dev/urandom | base64 | tr -d '/+=')
    mosquitto_passwd -b "$tmp" "$device" "$password"
    printf '%s\t%s\n' "$device" "$password"
done
mv "$tmp" "$out"
trap - EXIT
