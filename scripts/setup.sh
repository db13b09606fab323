#!/usr/bin/env bash
# Create .venv beside this repo and install clip-surgery with its dev tools. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
# torch and torchvision are pinned as a pair that imports together (see README, "Install").
case "$(uname -m)" in
    aarch64|arm64) torch_pins="torch==2.9.1 torchvision==0.24.1" ;;
    *) torch_pins="torch==2.14.1 torchvision==0.29.1" ;;
esac
# shellcheck disable=SC2086
.venv/bin/python -m pip install --quiet --disable-pip-version-check $torch_pins
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
# The web demo's browser test drives a real Chromium: Debian's package (Playwright's own browser
# download needs a CDN). Installed as root where apt-get exists, in CI always, else if missing.
if [ -n "${CI:-}" ] || ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    elif ! command -v chromium >/dev/null 2>&1; then
        echo "note: no chromium (apt-get install chromium as root); the browser test will skip"
    fi
fi
.venv/bin/python -c "import clip_surgery, torchvision; print('clip-surgery', clip_surgery.__version__, 'ready in .venv')"
