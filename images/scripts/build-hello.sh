#!/bin/sh
# Compiles the hello service into the image. Paths are remapped and debug info is off so that the same source
# always gives the same binary, and so the same image digest.
set -eu
mkdir -p "$KILN_ROOT/opt/hello/bin"
rustc --edition 2021 -C opt-level=2 -C debuginfo=0 -C strip=symbols -C codegen-units=1 \
  --remap-path-prefix="$KILN_ROOT=/" \
  -o "$KILN_ROOT/opt/hello/bin/hello" "$KILN_ROOT/opt/hello/src/main.rs"
