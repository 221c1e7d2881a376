"""Training throughput of one MFF pretraining step vs Hugging Face ViTMAEForPreTraining (same run, as a ratio).

    python bench/train_throughput.py --models s,b [--peer-bf16] [--repeats 3] [--markdown]

Same options as ``mffzoo bench train`` (this script is that command); the implementation is
:mod:`mffzoo.throughput.train`, the recorded results are in docs/benchmarks.md.
"""

import sys

from mffzoo.cli.main import main

if __name__ == "__main__":
    main(["bench", "train", *sys.argv[1:]])
