"""Training, the three paper stages on accelerate: `data` (talking-head videos -> samples, keypoint cache),
`losses`, `stages` (what each stage trains and its loss), `loop` (`train(cfg)`). Entry point: `train.py`."""
