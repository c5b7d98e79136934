"""mokd: train MOKD model pairs and evaluate self-supervised checkpoints the way the MOKD paper does.

Packages: `mokd.core` (the foundation everything stands on), `mokd_eval` (the evaluation protocols),
`mokd_train` (the trainer), `mokd_analysis` (analyses, tables and figures) and `mokd.cli` (the commands).
"""

__version__ = "0.1.0"
