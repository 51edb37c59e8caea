#!/bin/sh
# A worked example of the device-agent's exec-hook backend: a pretend copier whose whole state is
# a directory, driven by the agent through five hooks. Copy it and replace each function's body
# with calls to your machine's own tools (its service CLI, SNMP, a vendor SDK…).
#
# Wire it up in device-agent.toml:
#
#   [exec]
#   get_data     = ["/etc/chukei/example-device.sh", "get_data"]
#   apply        = ["/etc/chukei/example-device.sh", "apply"]
#   write_image  = ["/etc/chukei/example-device.sh", "write_image"]
#   switch_slot  = ["/etc/chukei/example-device.sh", "switch_slot"]
#   health_check = ["/etc/chukei/example-device.sh", "health_check"]
#
# The agent appends its arguments, sets CHUKEI_SERIAL and CHUKEI_HOME (the device's directory
# under the agent's data dir) and reads stdout. Exit 0 means done; any other status fails the job
# with the last line of stderr as the reason. Values travel as lines `section.name=value`, the
# value a JSON scalar: 5, true, "text" (bare text is accepted too).
#
#   get_data SECTION...            print the value lines of those sections
#   apply                          read value lines on stdin; apply all or nothing. Refuse with
#                                  exit 3 and lines `section.name=reason` on stdout
#   write_image SLOT IMAGE VERSION write IMAGE into SLOT (a or b, never the running one), read it
#                                  back and print its SHA-256
#   switch_slot SLOT               boot SLOT from now on
#   health_check SLOT VERSION      is the machine well on SLOT? exit 0 if so
#
# The agent reads the A/B state from `get_data identification`: active_slot, slot_a, slot_b.
#
# State (EXAMPLE_DEVICE_DIR, default $CHUKEI_HOME/example-device):
#   settings      value lines of the settable values
#   slots/a.img, slots/b.img, slots/a.version, slots/b.version, slots/active
#   unhealthy     versions (one a line) whose health check fails, to try a rollback

set -eu

DIR=${EXAMPLE_DEVICE_DIR:-${CHUKEI_HOME:-.}/example-device}
mkdir -p "$DIR/slots"
SETTINGS="$DIR/settings"

if [ ! -f "$SETTINGS" ]; then
    cat >"$SETTINGS" <<'EOF'
adjustment.density=5
adjustment.toner_save=false
call-settings.every_counts=15000
call-settings.at="02:00"
settings.host_url="mqtts://relay.example.com:8883"
EOF
fi

die() {
    echo "$*" >&2
    exit 1
}

active_slot() {
    if [ -f "$DIR/slots/active" ]; then cat "$DIR/slots/active"; else echo a; fi
}

slot_version() {
    if [ -f "$DIR/slots/$1.version" ]; then
        cat "$DIR/slots/$1.version"
    elif [ "$1" = a ]; then
        echo "1.0.0" # the factory image
    fi
}

get_data() {
    for section in "$@"; do
        case "$section" in
        identification)
            active=$(active_slot)
            echo "identification.serial=\"${CHUKEI_SERIAL:-unknown}\""
            echo "identification.model=\"Example Copier 100\""
            echo "identification.rom_version=\"$(slot_version "$active")\""
            echo "identification.active_slot=\"$active\""
            echo "identification.slot_a=\"$(slot_version a)\""
            echo "identification.slot_b=\"$(slot_version b)\""
            ;;
        counters)
            # A real device reads its meters; this one counts how often it was asked.
            n=$(cat "$DIR/reads" 2>/dev/null || echo 1000)
            n=$((n + 1))
            echo "$n" >"$DIR/reads"
            echo "counters.total=$n"
            ;;
        *)
            grep "^$section\." "$SETTINGS" || true
            ;;
        esac
    done
}

# Prints a refusal for one value line, or nothing if it is acceptable.
check_line() {
    key=${1%%=*}
    value=${1#*=}
    value=$(printf '%s' "$value" | sed 's/^"\(.*\)"$/\1/')
    case "$key" in
    adjustment.density)
        case "$value" in
        '' | *[!0-9]*) echo "$key=expected a whole number 1..=9, got $value" ;;
        *) if [ "$value" -lt 1 ] || [ "$value" -gt 9 ]; then echo "$key=$value is out of range 1..=9"; fi ;;
        esac
        ;;
    adjustment.toner_save)
        case "$value" in true | false) ;; *) echo "$key=expected true or false, got $value" ;; esac
        ;;
    call-settings.every_counts)
        case "$value" in
        '' | *[!0-9]*) echo "$key=expected a whole number 100..=100000, got $value" ;;
        *) if [ "$value" -lt 100 ] || [ "$value" -gt 100000 ]; then echo "$key=$value is out of range 100..=100000"; fi ;;
        esac
        ;;
    call-settings.at)
        printf '%s' "$value" | grep -Eq '^([01][0-9]|2[0-3]):[0-5][0-9]$' || echo "$key=$value is not a time HH:MM"
        ;;
    settings.host_url)
        case "$value" in mqtts://?* | wss://?* | https://?*) ;; *) echo "$key=$value is not a URL" ;; esac
        ;;
    *)
        echo "$key=is not a setting of this device"
        ;;
    esac
}

apply() {
    input=$(cat)
    refused=$(printf '%s\n' "$input" | while IFS= read -r line; do
        if [ -n "$line" ]; then check_line "$line"; fi
    done)
    if [ -n "$refused" ]; then
        printf '%s\n' "$refused"
        exit 3
    fi
    # All or nothing: build the new settings aside, then rename over the old.
    cp "$SETTINGS" "$SETTINGS.new"
    printf '%s\n' "$input" | while IFS= read -r line; do
        [ -n "$line" ] || continue
        key=${line%%=*}
        grep -v "^$key=" "$SETTINGS.new" >"$SETTINGS.tmp" || true
        printf '%s\n' "$line" >>"$SETTINGS.tmp"
        mv "$SETTINGS.tmp" "$SETTINGS.new"
    done
    mv "$SETTINGS.new" "$SETTINGS"
}

write_image() {
    slot=$1 image=$2 version=$3
    case "$slot" in a | b) ;; *) die "no slot $slot" ;; esac
    [ "$slot" != "$(active_slot)" ] || die "slot $slot is running; refusing to overwrite it"
    rm -f "$DIR/slots/$slot.version"
    cp "$image" "$DIR/slots/$slot.img" || die "could not write slot $slot"
    sync
    echo "$version" >"$DIR/slots/$slot.version"
    sha256sum "$DIR/slots/$slot.img" | cut -d' ' -f1
}

switch_slot() {
    case "$1" in a | b) ;; *) die "no slot $1" ;; esac
    echo "$1" >"$DIR/slots/active.tmp"
    mv "$DIR/slots/active.tmp" "$DIR/slots/active"
}

health_check() {
    version=$2
    if [ -f "$DIR/unhealthy" ] && grep -qx "$version" "$DIR/unhealthy"; then
        die "engine did not come up on $version"
    fi
}

hook=${1:-}
[ $# -gt 0 ] && shift
case "$hook" in
get_data | apply | write_image | switch_slot | health_check) "$hook" "$@" ;;
*) die "usage: $0 get_data|apply|write_image|switch_slot|health_check ARGS" ;;
esac
