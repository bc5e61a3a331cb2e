#!/bin/sh
# Boots one guest and runs a script in it: `emudev-guest boot` (see --help). Cases reach it
# as $RUN_GUEST.
exec "$(dirname "$0")/emudev-guest" boot "$@"
