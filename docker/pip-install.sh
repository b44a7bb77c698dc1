#!/bin/sh
# The build stage's install: docker/requirements-$FLAVOR.txt into the venv /opt/venv.
# Inputs, all optional but the first:
#   /build/requirements.txt       every package pinned
#   /build/certs/*.pem, *.crt     extra CA certificates for pip (a TLS-inspecting proxy)
#   /build/wheels/*.whl           a wheel folder: install from it alone
#   PIP_FIND_LINKS                a wheel server: install from it alone
#   PIP_INDEX_URL                 a package mirror (never printed: it may hold a token)
set -eu
python3 -m venv /opt/venv

bundle=/build/ca-bundle.pem
: > "$bundle"
for cert in /build/certs/*.pem /build/certs/*.crt; do
    if [ -f "$cert" ]; then
        cat "$cert" >> "$bundle"
        echo "pip trusts the certificates in $cert"
    fi
done
if [ -s "$bundle" ]; then
    # pip's own bundle plus ours: a proxy's CA alone would break direct connections.
    cat "$(/opt/venv/bin/python -c 'import pip._vendor.certifi as c; print(c.where())')" >> "$bundle"
    export PIP_CERT="$bundle"
fi

# Build arguments arrive as variables even when empty; pip must not see empty ones.
[ -n "${PIP_INDEX_URL:-}" ] || unset PIP_INDEX_URL
[ -n "${PIP_FIND_LINKS:-}" ] || unset PIP_FIND_LINKS
set --
if ls /build/wheels/*.whl >/dev/null 2>&1; then
    echo "installing from the wheel folder only"
    set -- --no-index --find-links /build/wheels
elif [ -n "${PIP_FIND_LINKS:-}" ]; then
    echo "installing from the wheel server $PIP_FIND_LINKS only"
    set -- --no-index --find-links "$PIP_FIND_LINKS"
fi
/opt/venv/bin/python -m pip install "$@" --no-deps --requirement /build/requirements.txt
/opt/venv/bin/python -m pip check
