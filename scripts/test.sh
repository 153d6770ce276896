#!/usr/bin/env bash
# Runs every test: unit tests, then integration tests against real Dovecot started on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cargo test --locked --all-targets "$@"
