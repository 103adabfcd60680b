"""Evaluation: the paper's metrics (`metrics`), the pretrained networks behind them (`networks`, `alignment`), and
the self-/cross-reenactment protocols with the Table 1 layout (`protocol`). Entry point: `tools/evaluate.py`."""
