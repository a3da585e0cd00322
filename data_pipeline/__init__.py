"""Posed multi-view renders -> WebDataset shards -> streaming training batches."""
