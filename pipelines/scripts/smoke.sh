#!/bin/sh
# dev's gate: the image must answer on its health and greeting endpoints. kiln passes KILN_DIGEST, KILN_STAGE,
# KILN_IMAGE_REF and, once the previous stage is deployed, KILN_PREVIOUS_ENDPOINT.
set -eu
echo "smoke-testing $KILN_DIGEST for $KILN_STAGE"
test -n "$KILN_IMAGE_REF"
