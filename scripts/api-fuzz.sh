#!/usr/bin/env bash
# Property-based run of the API against its OpenAPI document (schemathesis from PyPI, in
# .venv-schemathesis). The engine under test may contact loopback registries only, so the
# generated image references never leave the machine. Passes when no request gets a 5xx.
#   ./scripts/api-fuzz.sh [max-examples-per-operation, default 100]
set -euo pipefail
cd "$(dirname "$0")/.."
examples="${1:-100}"
[ -x .venv-schemathesis/bin/st ] || { python3 -m venv .venv-schemathesis && .venv-schemathesis/bin/pip install -q schemathesis; }
cargo build --release -q
dir=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$dir/triggers.toml" <<TOML
[server]
listen = "127.0.0.1:$port"
allowed_registries = ["127.0.0.1:*", "localhost:*"]
[store]
path = "$dir/istream.db"
TOML
./target/release/istream serve --config "$dir/triggers.toml" 2> "$dir/serve.log" &
engine=$!
trap 'kill $engine 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
# /api/v1/watch is an endless event stream: every call would wait out the client timeout.
.venv-schemathesis/bin/st run "http://127.0.0.1:$port/api/v1/openapi.json" \
  --checks not_a_server_error --max-examples "$examples" --workers 2 \
  --exclude-path /api/v1/watch
