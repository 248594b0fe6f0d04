#!/usr/bin/env bash
# The test command (README, .ci/run): installs what the tests need, then checks
# formatting, lint and types, then runs the whole test suite. Extra arguments go to
# pytest (e.g. `bash test.sh -k netstring`).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

# Debian packages the interoperability tests drive (real socat, real nginx + Lua, a
# real browser), and what they build the C sockexec with
# (../shared/reference/build-sockexec.sh).
missing=()
command -v socat >/dev/null 2>&1 || missing+=(socat)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v nginx >/dev/null 2>&1 || missing+=(nginx)
command -v gcc >/dev/null 2>&1 || missing+=(gcc)
# The dashboard's browser tests (selenium drives Debian's chromium through its driver).
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
for pkg in libnginx-mod-http-lua lua-resty-core lua-socket libc6-dev skalibs-dev; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ((${#missing[@]})); then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        echo "test.sh: installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
    else
        echo "test.sh: missing ${missing[*]} (install them, or the tests that need them skip;" \
             "under CI=true they fail)" >&2
    fi
fi

"$PYTHON" -m pip install -q --disable-pip-version-check -e '.[test]'
# The tests start a few hundred brokers and gateways, each importing the package: with
# PYTHONDONTWRITEBYTECODE set (as in some CI images) and an editable install, each
# would compile it from source again (80-120 ms a start). compileall writes the
# bytecode whatever that variable says.
"$PYTHON" -m compileall -q sockexec_py >/dev/null

"$PYTHON" -m ruff format --check sockexec_py tests bench fuzz
"$PYTHON" -m ruff check sockexec_py tests bench fuzz
"$PYTHON" -m mypy sockexec_py bench fuzz
exec "$PYTHON" -m pytest "$@"
