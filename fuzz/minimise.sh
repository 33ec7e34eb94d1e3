#!/usr/bin/env bash
# Minimises the corpus of one fuzz target for committing: libFuzzer's merge
# of fuzz/corpus/TARGET and fuzz/seeds/TARGET on edges only, then at most
# 200 files by a greedy cover (cap_corpus.py). Run after
# `cargo +nightly fuzz build` (or `run`) from the fuzz/ folder:
#   ./minimise.sh TARGET
set -euo pipefail
t=$1
cd "$(dirname "$0")"
bin=target/x86_64-unknown-linux-gnu/release/$t
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/edge" "$work/again"
"$bin" -merge=1 -use_counters=0 -timeout=10 "$work/edge" "corpus/$t" "seeds/$t" > "$work/merge.log" 2>&1
"$bin" -merge=1 -use_counters=0 -timeout=10 -merge_control_file="$work/control" \
  "$work/again" "$work/edge" > "$work/control.log" 2>&1
python3 cap_corpus.py "$work/control" 200 > "$work/keep"
rm -rf "corpus/$t" && mkdir "corpus/$t"
xargs -a "$work/keep" cp -t "corpus/$t"
echo "corpus/$t: $(ls "corpus/$t" | wc -l) files"
