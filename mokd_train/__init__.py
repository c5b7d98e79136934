"""mokd_train: train MOKD model pairs (and their Independent/DINO baseline)."""
