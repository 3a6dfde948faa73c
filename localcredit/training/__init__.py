"""Training: the Trainer (the loop; it knows no rule), run files and checkpoints, augmentation, and the
data-parallel and block-pipeline layouts."""
