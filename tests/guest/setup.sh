#!/bin/sh
# Builds or refreshes the guest cache (root; idempotent): `emudev-guest setup`.
exec "$(dirname "$0")/emudev-guest" setup "$@"
