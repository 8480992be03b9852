"""Entry point: ``deepspeed ami_dist/train.py --deepspeed_config configs/ds_zero2.json --config <run>.yaml``.

Also runs under ``torchrun``, Slurm's ``srun`` or as a single plain process.
"""

import os
import sys

# Run as a script, Python puts this file's directory first on sys.path, where our subpackages
# (data, models, ...) could shadow top-level modules of the same name; the package is imported by name.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

from ami_dist.cli import main

if __name__ == "__main__":
    sys.exit(main())
