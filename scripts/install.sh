#!/usr/bin/env bash
# Create the project's virtual environment and install glmtune into it.
# A torch that the system Python already has (a CUDA build on a GPU box) is reused, never replaced;
# otherwise the CPU build torch==2.13.0 is installed (pre-cached on these machines; an unpinned
# torch would pull several GB of CUDA packages).
#
# The browser test of `glmtune web` (tests/test_web_browser.py) drives Debian's Chromium headless. When
# `chromium` is missing and apt-get can be used (root, or sudo without a password), it is installed with
# apt-get; otherwise this says how to install it and that test skips. GLMTUNE_SKIP_CHROMIUM=1 leaves it out.
set -euo pipefail
venv=${1:-.venv}
python=${PYTHON:-python3}

if "$python" -c "import torch" >/dev/null 2>&1; then
    echo "install: reusing the system torch ($("$python" -c 'import torch; print(torch.__version__)'))"
    "$python" -m venv --system-site-packages "$venv"
else
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q "torch==2.13.0"
fi
"$venv/bin/python" -m pip install -q -e ".[dev]"

chromium_packages="chromium chromium-driver fonts-wqy-zenhei"  # the font: Chinese in its screenshots
if [ "${GLMTUNE_SKIP_CHROMIUM:-0}" = 1 ]; then
    echo "install: GLMTUNE_SKIP_CHROMIUM=1: not installing Chromium (the browser test will skip)"
elif command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    echo "install: $(chromium --version 2>/dev/null || echo chromium) found (for the browser test)"
elif command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" = 0 ] || sudo -n true >/dev/null 2>&1; }; then
    apt="apt-get"
    [ "$(id -u)" = 0 ] || apt="sudo -n apt-get"
    export DEBIAN_FRONTEND=noninteractive
    echo "install: the browser test needs Debian's Chromium; running:"
    echo "install:   $apt update && $apt install -y --no-install-recommends $chromium_packages"
    start=$(date +%s)
    [ "$(id -u)" = 0 ] || apt="sudo -n env DEBIAN_FRONTEND=noninteractive apt-get"
    if $apt update -qq && $apt install -y -qq --no-install-recommends $chromium_packages >/dev/null; then
        echo "install: $(chromium --version 2>/dev/null) installed in $(($(date +%s) - start)) s"
    else
        echo "install: apt-get could not install $chromium_packages; the browser test will skip" >&2
    fi
else
    echo "install: Chromium is not installed and apt-get cannot be used here (not root, no password-less sudo)."
    echo "install: the browser test of 'glmtune web' will skip; to run it, install Chromium and its driver:"
    echo "install:   sudo apt-get install --no-install-recommends $chromium_packages   (Debian/Ubuntu)"
fi
