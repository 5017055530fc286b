"""Data: corpora -> tokenizer -> WebDataset shards (prepare), and the streaming loader with its exact cursor.

This package is the only importer of webdataset.
"""
