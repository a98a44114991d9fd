#!/usr/bin/env bash
# pycocoevalcap's PTB tokenizer and METEOR run java. Install a headless JRE when it is missing and
# we may (root with apt-get); otherwise say how, and fail so that nobody runs tests without it.
set -euo pipefail
if command -v java >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "java not found: installing a headless JRE with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends default-jre-headless >/dev/null
  exit 0
fi
echo "java not found: caption metrics need it. Install a JRE (Debian/Ubuntu: sudo apt-get install default-jre-headless; macOS: brew install openjdk) and rerun." >&2
exit 1
