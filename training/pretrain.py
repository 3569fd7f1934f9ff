"""Pretrain SANE on a zoo dataset with Accelerate.

    python training/pretrain.py --config training/configs/tiny.yaml --dataset ZOO --output-dir OUT
    accelerate launch --multi_gpu --num_processes 8 training/pretrain.py --config training/configs/cnn.yaml ...

The script is `sane_hf.pretraining.loop` (also ``sane-hf pretrain``); its docstring describes the config.
"""

import sys

from sane_hf.pretraining.loop import main

if __name__ == "__main__":
    sys.exit(main())
