#!/usr/bin/env bash
# Builds every fuzz target with libFuzzer's coverage instrumentation on the stable
# toolchain (the flags `cargo fuzz --sanitizer none` passes), seeds each corpus from
# tests/fixtures, and runs each target for SECONDS (default 60). Exits non-zero on the
# first crash, leak of the rss limit, or timeout; the input is kept in fuzz/artifacts/.
#   fuzz/run.sh 60            # every target, 60 s each
#   fuzz/run.sh 600 parse     # one target
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(parse header yaml model writer)
fi
triple="$(rustc -vV | sed -n 's/^host: //p')"
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
# --target keeps the flags off build scripts and proc macros.
cargo build --release --target "$triple" $(printf -- '--bin %s ' "${targets[@]}")

fixtures=../tests/fixtures
seed() {
    local target="$1" dir="corpus/$1"
    mkdir -p "$dir"
    case "$target" in
        parse) cp ../examples/*.merge ../tests/conformance/*.merge ../tests/ui/*.merge "$dir"/ ;;
        yaml) find "$fixtures/yaml" "$fixtures/conformance/configs" -name '*.yml' -exec cp {} "$dir"/ \; ;;
        header)
            for f in "$fixtures"/conformance/models/*/model.safetensors; do
                # the 8-byte length and the JSON header only
                n=$(( $(od -An -t u8 -N8 "$f" | tr -d ' ') + 8 ))
                head -c "$n" "$f" > "$dir/$(basename "$(dirname "$f")")"
            done ;;
        model)
            for d in "$fixtures"/conformance/models/*/; do
                f="$d/model.safetensors"
                n=$(( $(od -An -t u8 -N8 "$f" | tr -d ' ') + 8 ))
                { cat "$d/config.json"; printf '\377'; printf '{"weight_map":{}}'; printf '\377'; head -c "$n" "$f"; } \
                    > "$dir/$(basename "$d")"
            done ;;
        writer)
            # a flag byte (bit 0: --force), then the output path
            i=0
            for p in out ../old ../empty ../mine ../mine/sub . .. up to-mine/new ../input/x \
                loop/x dangling to-home ../scripts ../old/sub ./out/../../work ../mine/o/../; do
                printf '\001%s' "$p" > "$dir/force-$i"
                printf '\000%s' "$p" > "$dir/plain-$i"
                i=$((i + 1))
            done ;;
    esac
}
mkdir -p artifacts
total=0
for t in "${targets[@]}"; do
    seed "$t"
    log="artifacts/$t.log"
    # Absolute paths: a target may change its working folder (the writer's does).
    "target/$triple/release/$t" "$PWD/corpus/$t" -max_total_time="$seconds" -rss_limit_mb=2048 \
        -timeout=10 -max_len=65536 -artifact_prefix="$PWD/artifacts/$t-" -print_final_stats=1 >"$log" 2>&1 || {
        tail -40 "$log"
        echo "fuzz target $t failed; the input is in fuzz/artifacts/" >&2
        exit 1
    }
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    echo "fuzz $t: ${runs:-?} runs in ${seconds} s, no crash"
    total=$((total + ${runs:-0}))
done
echo "fuzz: $total runs in all"
