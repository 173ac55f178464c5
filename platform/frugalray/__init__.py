"""frugalray: train and serve language models on Ray under explicit FLOP, memory and data budgets."""

__version__ = "0.1.0"
