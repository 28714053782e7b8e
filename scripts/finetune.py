#!/usr/bin/env python
"""Fine-tune a MoE checkpoint with moepatch (dynamic data mixing, frozen gates, C2R from config.json).

    python scripts/finetune.py --model_name_or_path CKPT --data_dir DATA --output_dir OUT --max_steps 2000 ...
    deepspeed --num_gpus 4 scripts/finetune.py --recipe configs/llama_moe_dynamic.json --model_name_or_path CKPT ...
    torchrun --nproc_per_node 2 scripts/finetune.py ... --deepspeed configs/deepspeed/zero3_cpu.json --use_cpu

``python scripts/finetune.py --help`` lists every argument (moepatch's and transformers' TrainingArguments).
Every input is checked before a model is loaded or a file is written: a bad one exits with status 2 and one line
naming the argument, a failure found while running (a malformed data record, ...) with status 1 naming the file and
line.  ``--debug`` (or ``MOEPATCH_DEBUG=1``) shows the traceback instead.
"""

import sys

from moepatch.training import main

if __name__ == "__main__":
    sys.exit(main())
