"""Run a documentation example script on CPU, one rank of `torchrun`:

    torchrun --standalone --nproc-per-node 2 tests/run_example.py train_megatron.py

The docs test runs multi-process examples this way. megatron-core 0.16.1 assumes CUDA
in a few places; a script that uses it gets `megatron_harness.patch_megatron_for_cpu`
first. That belongs here, in the test runner: the examples are written for GPUs and
never show it, and the library never patches megatron-core.
"""

from __future__ import annotations

import logging
import runpy
import sys
import warnings
from pathlib import Path

import torch


def main() -> None:
    script = Path(sys.argv[1])
    sys.argv = sys.argv[1:]  # the script sees its own argv
    torch.set_num_threads(1)  # the ranks share a small machine
    if "megatron" in script.read_text():
        # Without Transformer Engine or Apex megatron-core warns on import and every layer.
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        from megatron_harness import patch_megatron_for_cpu

        patch_megatron_for_cpu()
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
