#!/bin/sh
# Compiles the hello service into the image. Paths are remapped and debug info is off so that the same source
# always gives the same binary, and so the same image digest.
set -eu
# An AMI builder (Amazon Linux 2023) has no compiler: take the distribution's. Locally rustc is already there.
if ! command -v rustc >/dev/null 2>&1 && command -v dnf >/dev/null 2>&1; then
  dnf install -y -q rust
fi
mkdir -p "$KILN_ROOT/opt/hello/bin"
rustc --edition 2021 -C opt-level=2 -C debuginfo=0 -C strip=symbols -C codegen-units=1 \
  --remap-path-prefix="$KILN_ROOT=/" \
  -o "$KILN_ROOT/opt/hello/bin/hello" "$KILN_ROOT/opt/hello/src/main.rs"
# On an AMI nothing starts the service but systemd: a unit, enabled when baking on the builder itself
# (KILN_ROOT=/). Locally it is an inert file in the image; kiln starts instances from [instance].
mkdir -p "$KILN_ROOT/etc/systemd/system"
cat > "$KILN_ROOT/etc/systemd/system/hello.service" <<'UNIT'
[Unit]
Description=hello, baked by kiln
After=network-online.target

[Service]
ExecStart=/opt/hello/bin/hello
Environment=PORT=8080 GREETING=hello
Restart=always

[Install]
WantedBy=multi-user.target
UNIT
if [ "$KILN_ROOT" = "/" ] && command -v systemctl >/dev/null 2>&1; then
  systemctl enable hello.service
fi
