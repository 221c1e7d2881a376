"""Training throughput of one MFF pretraining step vs Hugging Face ViTMAEForPreTraining under the same precision
(same run, as a ratio; also against the fastest peer row).

    python bench/train_throughput.py --models s,b [--peers auto,hf] [--repeats 3] [--markdown]
    python bench/train_throughput.py --recipe recipes/vits.yaml --set train.batch_per_device=16 [--repeats 3]

Same options as ``mffzoo bench train`` (this script is that command); the implementation is
:mod:`mffzoo.bench.train`, the recorded results are in docs/benchmarks.md.
"""

import sys

from mffzoo.cli.main import main

if __name__ == "__main__":
    main(["bench", "train", *sys.argv[1:]])
