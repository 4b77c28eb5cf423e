#!/usr/bin/env bash
# Install what is missing, then start the offline demo microsite on http://127.0.0.1:7860.
# Extra arguments go to app.py, e.g. `bash scripts/demo.sh --port 8000`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export GRADIO_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
exec python app.py --preset demo "$@"
