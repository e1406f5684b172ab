"""`python -m cachetrain ...`, and so `torchrun --nproc-per-node N -m cachetrain train ...`."""

from cachetrain.cli import entry

if __name__ == "__main__":
    entry()
