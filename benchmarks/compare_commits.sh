#!/usr/bin/env bash
# Speed of two versions of dsv3 on one GPU, in one call: `benchmarks/engine_gpu.py` (LLM.generate: decode at
# batch 1 and 32, prefill of 32 x 512 prompts, the transformers peer) and `benchmarks/decode.py` (the step
# itself: prefill 1x512 and 32x512, graph-replayed decode at batch 1, 32, 128), each version in its own
# folder with PYTHONPATH pointing at it, one process per script and version, each under a `timeout` so that
# partial results still come back. JSON lines go to $OUT (engine_{new,old}.jsonl, decode_{new,old}.jsonl),
# every script's output to $OUT/log.txt, and a table old vs new to $OUT/summary.txt and to stdout, last.
#
# engine_gpu.py is the NEW tree's script for both versions (it uses only LLM's public interface, so the same
# measurement runs on both); decode.py is each version's own script (it drives the version's internals).
#
# The GPU machine gets a copy of the working tree without .git, so the old version travels as a tarball of
# its dsv3/ and benchmarks/ (the shipped default model left out), made here first:
#
#   bash benchmarks/compare_commits.sh --prepare 9891417       # here: writes .carry/dsv3-9891417.tar.gz
#   bash benchmarks/compare_commits.sh 9891417                 # there (carry .carry/dsv3-9891417.tar.gz):
#                                                              # OLD = 9891417, NEW = this working tree
#   bash benchmarks/compare_commits.sh 9891417 f5046d2         # NEW from a commit too (tarball or git)
#
# Environment: OUT (default /tmp/compare_out), PYTHON (default python3), the part time limits in seconds
# ENGINE_NEW_S (default 230), ENGINE_OLD_S (140), DECODE_NEW_S (90), DECODE_OLD_S (90), and extra arguments
# ENGINE_ARGS (default none) and DECODE_ARGS (default `--models 16B`), e.g. for a CPU smoke test of this script:
#   ENGINE_ARGS="--device cpu --model tiny --batch 1 2 --prefill-batch 2 --prompt-len 16 --new-tokens 3 \
#   --slow-new-tokens 3 --peer-new-tokens 3 --repeats 1" DECODE_ARGS="--device cpu --models tiny --batches 1 2 \
#   --prefill-batches 1 --steps 2" bash benchmarks/compare_commits.sh 9891417
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"

tarball() { echo "$ROOT/.carry/dsv3-$1.tar.gz"; }

if [ "${1:-}" = "--prepare" ]; then
    shift
    [ $# -ge 1 ] || { echo "usage: $0 --prepare REF [REF...]" >&2; exit 2; }
    mkdir -p "$ROOT/.carry"
    for ref in "$@"; do
        git -C "$ROOT" archive --format=tar.gz -o "$(tarball "$ref")" "$ref" -- dsv3 benchmarks ':!dsv3/assets' \
            || exit 1
        echo "wrote $(tarball "$ref") ($(du -h "$(tarball "$ref")" | cut -f1)); pass it to the device run as carry"
    done
    exit 0
fi

[ $# -ge 1 ] && [ $# -le 2 ] || { echo "usage: $0 OLD [NEW]   (or --prepare REF)" >&2; exit 2; }
OLD="$1"
NEW="${2:-worktree}"
OUT="${OUT:-/tmp/compare_out}"
mkdir -p "$OUT"
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1

# A folder holding dsv3/ and benchmarks/ of REF: this tree for "worktree", else the prepared tarball, else git.
checkout() {
    local ref="$1" dir="/tmp/dsv3-$1"
    if [ "$ref" = worktree ]; then echo "$ROOT"; return 0; fi
    rm -rf "$dir" && mkdir -p "$dir" || return 1
    if [ -f "$(tarball "$ref")" ]; then
        tar -xzf "$(tarball "$ref")" -C "$dir" || return 1
    elif git -C "$ROOT" rev-parse --verify -q "$ref^{commit}" >/dev/null 2>&1; then
        git -C "$ROOT" archive "$ref" -- dsv3 benchmarks ':!dsv3/assets' | tar -x -C "$dir" || return 1
    else
        echo "no $(tarball "$ref") and no git history here for $ref (run --prepare $ref where git is)" >&2
        return 1
    fi
    echo "$dir"
}

NEW_DIR="$(checkout "$NEW")" || exit 1
OLD_DIR="$(checkout "$OLD")" || exit 1
{
    echo "== compare_commits: OLD=$OLD ($OLD_DIR) NEW=$NEW ($NEW_DIR) $(date -u +%FT%TZ)"
    nvidia-smi -L 2>&1
    for d in "$OLD_DIR" "$NEW_DIR"; do
        PYTHONPATH="$d" "$PY" -c "import sys, dsv3, torch, triton; print(dsv3.__file__, 'torch', torch.__version__, \
'triton', triton.__version__, 'python', sys.version.split()[0])" 2>&1
    done
    "$PY" -c "import transformers; print('transformers', transformers.__version__)" 2>&1
} | tee -a "$LOG"

# part NAME SECONDS TREE SCRIPT ARGS...: run SCRIPT with dsv3 from TREE, JSON lines to $OUT/NAME.jsonl
part() {
    local name="$1" seconds="$2" tree="$3" script="$4"
    shift 4
    rm -f "$OUT/$name.jsonl"
    echo "== $name: PYTHONPATH=$tree $script $* (limit ${seconds}s)" | tee -a "$LOG"
    local t0=$SECONDS
    PYTHONPATH="$tree" timeout --kill-after=15 "$seconds" "$PY" "$script" --log "$OUT/$name.jsonl" "$@" 2>&1 \
        | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - t0))s$([ "$rc" = 124 ] && echo ' (timed out: partial results)')" \
        | tee -a "$LOG"
}

# the targets first (new, then old), the step-level script after
ENGINE_ARGS="${ENGINE_ARGS:-}"
DECODE_ARGS="${DECODE_ARGS:---models 16B}"
# shellcheck disable=SC2086  # the ARGS are word lists
{
part engine_new "${ENGINE_NEW_S:-230}" "$NEW_DIR" "$NEW_DIR/benchmarks/engine_gpu.py" $ENGINE_ARGS
part engine_old "${ENGINE_OLD_S:-140}" "$OLD_DIR" "$NEW_DIR/benchmarks/engine_gpu.py" $ENGINE_ARGS --no-hf
part decode_new "${DECODE_NEW_S:-90}" "$NEW_DIR" "$NEW_DIR/benchmarks/decode.py" $DECODE_ARGS --no-peer
part decode_old "${DECODE_OLD_S:-90}" "$OLD_DIR" "$OLD_DIR/benchmarks/decode.py" $DECODE_ARGS --no-peer
}

"$PY" - "$OUT" "$OLD" "$NEW" <<'EOF' | tee "$OUT/summary.txt"
import json
import sys
from pathlib import Path

out, old, new = Path(sys.argv[1]), sys.argv[2], sys.argv[3]


def rows(name):
    path = out / f"{name}.jsonl"
    if not path.exists():
        return []
    found = []
    for line in path.read_text().splitlines():
        try:
            found.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return found


def engine_cases(name):
    cases = {}
    for r in rows(name):
        if "peer" in r:  # a ratio row
            continue
        if r.get("case") == "decode" and "engine" in r:
            cases[(r["engine"], "decode tok/s", r["batch"])] = r.get("decode_tok_s")
        elif r.get("case") == "prefill" and "engine" in r:
            cases[(r["engine"], "prefill prompt tok/s", r["batch"])] = r.get("prompt_tok_s")
    return cases


def decode_cases(name):
    cases = {}
    for r in rows(name):
        if r.get("impl") == "dsv3" and r.get("case") in ("prefill", "decode"):
            mode = "graph" if r.get("graphs") else "eager"
            cases[(f"step {r['model']}", f"{r['case']} tok/s ({mode})", r["batch"])] = r.get("tokens_per_s")
        elif r.get("case") == "decode_eager":
            cases[(f"step {r['model']}", "decode ms/step (eager)", r["batch"])] = r.get("ms_per_step")
    return cases


def fmt(v):
    return "-" if v is None else f"{v:,.1f}"


print(f"\n== old {old} vs new {new} (one H200, same call) ==")
print(f"{'what':<44} {'batch':>5} {'old':>12} {'new':>12} {'new/old':>8}")
for script, get in (("engine", engine_cases), ("decode", decode_cases)):
    o, n = get(f"{script}_old"), get(f"{script}_new")
    for key in sorted(set(o) | set(n), key=lambda k: (k[0], k[1], k[2])):
        a, b = o.get(key), n.get(key)
        ratio = f"{b / a:.2f}" if a and b else "-"
        print(f"{key[0] + ' ' + key[1]:<44} {key[2]:>5} {fmt(a):>12} {fmt(b):>12} {ratio:>8}")
targets = [r for r in rows("engine_new") if "target" in r]
if targets:
    print("\ntargets (new, fast engine):")
    for r in targets:
        value = r.get("decode_tok_s", r.get("prompt_tok_s"))
        print(f"  {r['case']} batch {r['batch']}: {fmt(value)} vs >= {r['target']:,}: {'met' if r['met'] else 'MISSED'}")
ratios = [r for r in rows("engine_new") if "peer" in r]
if ratios:
    print("\nnew engine vs peers:")
    for r in ratios:
        extra = f", greedy agreement {r['greedy_token_agreement']}" if "greedy_token_agreement" in r else ""
        print(f"  {r['case']} batch {r['batch']}: {r['engine']} {fmt(r['tok_s'])} / {r['peer']} "
              f"{fmt(r['peer_tok_s'])} = {r['ratio']}{extra}")
errors = [r for name in ("engine_new", "engine_old", "decode_new", "decode_old") for r in rows(name) if "error" in r]
for r in errors:
    print("error:", r)
EOF
