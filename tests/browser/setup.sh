#!/usr/bin/env bash
# Installs what tests/test_browser.py needs, only what is missing (a no-op taking well under a second
# when everything is there): Debian's chromium + chromium-driver, and the pinned Selenium in the venv.
#   bash tests/browser/setup.sh              # uses .venv/bin/python
#   PY=/path/to/python bash tests/browser/setup.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PY:-.venv/bin/python}"
REQ=tests/browser/requirements.txt

missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
if ((${#missing[@]})); then
  echo "browser test setup: installing ${missing[*]} (apt-get)"
  SUDO=()
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "need root or sudo to apt-get install ${missing[*]}" >&2; exit 1; }
    SUDO=(sudo)
  fi
  "${SUDO[@]}" apt-get update -q
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

[ -x "$PY" ] || { echo "no Python at $PY: run 'make setup' first (or set PY=...)" >&2; exit 1; }
want=$(sed -n 's/^selenium==\([^ #]*\).*/\1/p' "$REQ")
have=$("$PY" -c 'import selenium; print(selenium.__version__)' 2>/dev/null || true)
if [ "$have" != "$want" ]; then
  echo "browser test setup: installing selenium==$want into $("$PY" -c 'import sys; print(sys.prefix)')"
  "$PY" -m pip install --disable-pip-version-check -q -r "$REQ"
fi

echo "browser test setup: $(chromium --version 2>/dev/null | head -1); $(chromedriver --version | cut -d' ' -f1-2); selenium $want"
