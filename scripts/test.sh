#!/usr/bin/env bash
# Runs every test: style (rustfmt, clippy), unit tests, then integration tests against real
# Dovecot, Postfix and PostgreSQL started on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
# rustfmt and clippy come with rustup's default profile; added where a minimal one was installed.
cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
cargo fmt --all --check
cargo clippy --locked --all-targets -- -D warnings
cargo test --locked --all-targets "$@"
