#!/usr/bin/env bash
# Install what is missing (test tools and, as root, Debian's chromium for the browser tests),
# then run the test suite offline. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
KIT_DEV=1 bash scripts/setup.sh
. .venv/bin/activate

if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
fi

export GRADIO_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
exec python -m pytest "$@"
