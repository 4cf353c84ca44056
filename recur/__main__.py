"""``python -m recur ...`` is the ``recur`` command; under torchrun every process runs it:

    torchrun --standalone --nproc-per-node 2 -m recur run --task mqar --model gla --batch-size 64
"""

from recur.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
