#!/usr/bin/env bash
# Writes a self-signed development certificate for localhost/127.0.0.1 (never for production).
set -euo pipefail
dir=${1:-$(dirname "$0")}
openssl req -x509 -newkey rsa:2048 -nodes -days 825 \
  -keyout "$dir/server.key" -out "$dir/server.pem" \
  -subj "/CN=localhost" \
  -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" 2>/dev/null
chmod 600 "$dir/server.key"
echo "wrote $dir/server.pem and $dir/server.key"
