"""Data: clip tars -> WebDataset shards (`msaflow shards`), the streaming loader, MMSA pickles, and
the one data source `train`, `evaluate` and `predict` read batches of the batch contract from."""
