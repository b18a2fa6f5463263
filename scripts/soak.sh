#!/usr/bin/env bash
# Crash soak (not part of CI's default run): ./scripts/soak.sh SECONDS [sqlite|nats]
# Needs what scripts/test.sh installs (docker-registry; .venv's nats-server for nats).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --bin istream
exec python3 scripts/soak.py "${1:-60}" "${2:-sqlite}"
