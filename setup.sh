#!/usr/bin/env bash
# Create .venv/ with the tested packages. Idempotent: rerun it after pulling.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
echo "ready: activate with '. .venv/bin/activate'"
