"""Run by tests/test_multiprocess.py under `accelerate launch` with 2 processes:
python ddp_run.py METHOD key=value ..."""

import sys

from demoalign.config import CONFIGS, load_config
from demoalign.run import train

if __name__ == "__main__":
    train(load_config(CONFIGS[sys.argv[1]], None, sys.argv[2:]))
