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

# Files no step opens at run time (sizes measured in the gpu venv, 2026-11-30): TensorFlow's C++
# headers for building custom ops (287 MB); libclang (62 MB, for TensorFlow's source tools);
# NVSHMEM's device bitcode, static library and network transports (215 MB): JAX's CUDA plugin
# loads only libnvshmem_host at start, one GPU uses no NVSHMEM, and its device code is built
# for sm_70/80/89/90/100, none for an RTX 2070 (sm_75). Without them the gpu venv is 6,853 MiB,
# under the 6,865 MiB of the TensorFlow-with-CUDA venv it replaced (bench/RESULTS.md).
site=$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
rm -rf "$site/tensorflow/include" "$site/clang"
for file in "$site"/nvidia/nvshmem/lib/*.bc "$site"/nvidia/nvshmem/lib/*.a \
            "$site"/nvidia/nvshmem/lib/nvshmem_transport_* "$site"/nvidia/nvshmem/lib/nvshmem_bootstrap_*; do
    case "$file" in *bootstrap_uid*) ;; *) rm -f "$file" ;; esac
done
