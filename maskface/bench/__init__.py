"""Speed measurements for benchmark.py: the training loop against its ceiling, the competition's
usual pipeline as the yardstick, and whole jobs timed back to back."""
