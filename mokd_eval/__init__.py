"""mokd_eval: evaluate self-supervised checkpoints the way the MOKD paper does."""

__version__ = "0.1.0"
