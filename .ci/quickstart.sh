#!/usr/bin/env bash
# The README's promise, checked as a new user would: a fresh `cargo new`
# project whose [dependencies] are exactly the README's lines (with the crate
# taken from this checkout by path) and whose src/main.rs is exactly the
# README's quick start must build and run.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
# The first ```toml block after "## Add it", the first ```rust block after
# "## Quick start".
block() { awk -v h="$1" -v lang="$2" '
  $0 ~ "^## " h { on = 1; next }
  on && $0 == "```" lang { grab = 1; next }
  grab && $0 == "```" { exit }
  grab { print }' "$repo/README.md"; }
deps=$(block "Add it" toml)
main=$(block "Quick start" rust)
[ -n "$deps" ] && [ -n "$main" ] || { echo "quickstart: README blocks not found"; exit 1; }
cargo new --quiet --vcs none "$dir/quickstart"
cd "$dir/quickstart"
# Keep the README's [dependencies] lines, pointing the crate at this checkout.
echo "$deps" | grep -v '^\[dependencies\]' \
  | sed -E "s#^llm-resilience = \{ version = \"[^\"]*\"#llm-resilience = { path = \"$repo\"#" >> Cargo.toml
echo "$main" > src/main.rs
cp "$repo/Cargo.lock" .
CARGO_TARGET_DIR="$repo/target/quickstart" cargo run --quiet
echo "quickstart: the README's quick start builds and runs in a new project"
