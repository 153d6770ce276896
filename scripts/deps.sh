#!/usr/bin/env bash
# Installs the Debian packages the demo and the tests need (real Dovecot, mbsync, swaks,
# PostgreSQL for the state store tests, OpenLDAP's slapd and ldap-utils for the LDAP directory).
set -euo pipefail
pkgs=(dovecot-imapd dovecot-lmtpd isync swaks postfix openssl postgresql slapd ldap-utils)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  # Postfix asks how to configure itself; the tests run their own instances.
  echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
  # Nor a system slapd: the tests run their own (tests/support/ldap.rs).
  echo "slapd slapd/no_configuration boolean true" | $SUDO debconf-set-selections
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
