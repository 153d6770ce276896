#!/usr/bin/env bash
# Demo: local Dovecot backends, mailferry in front, a user moved from legacy to new.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cargo build --release --quiet --bin mailferry --example demo
exec target/release/examples/demo "$@"
