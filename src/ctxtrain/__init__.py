"""ctxtrain: train Transformers where context is long and memory is the limit."""

__version__ = "0.1.0"
