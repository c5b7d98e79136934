"""`python -m mokd_train` / `torchrun -m mokd_train ...`: the `mokd-train` command."""

from mokd.cli import mokd_train

if __name__ == "__main__":
    mokd_train()
