#!/usr/bin/env bash
# Create the project's virtual environment and install glmtune into it.
# A torch that the system Python already has (a CUDA build on a GPU box) is reused, never replaced;
# otherwise the CPU build torch==2.13.0 is installed (pre-cached on these machines; an unpinned
# torch would pull several GB of CUDA packages).
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
