"""Run by tests/test_multiprocess.py under `accelerate launch` with 2 CPU processes:
REFUSING_RANK=R python main_decides_run.py METHOD key=value ...

The process of rank R sees the output folder as one it may not use (its check raises), as a
process on another machine might while the folder's state reaches it late. The run must follow
the main process's view: refused everywhere if the main one refuses, run if only another does."""

import os
import sys

import demoalign.run
from demoalign.config import CONFIGS, load_config
from demoalign.runio import RunFolderError

_check = demoalign.run.check_output_dir


def check_as_this_process_sees_it(*args, **kwargs):
    rank = os.environ["REFUSING_RANK"]
    if os.environ.get("RANK") == rank:
        raise RunFolderError(f"process {rank} sees a folder it may not use")
    return _check(*args, **kwargs)


if __name__ == "__main__":
    demoalign.run.check_output_dir = check_as_this_process_sees_it
    demoalign.run.train(load_config(CONFIGS[sys.argv[1]], None, sys.argv[2:]))
