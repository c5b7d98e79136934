"""Run the commands from a checkout: `python cli.py knn CKPT` (installed: `mokd-eval`, `mokd-train`)."""

from mokd.cli import mokd_eval, mokd_train

__all__ = ["mokd_eval", "mokd_train"]

if __name__ == "__main__":  # pragma: no cover
    mokd_eval()
