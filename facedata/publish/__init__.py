"""Publishing a finished run: HF parquet and webdataset shards, the dataset card, the Hub."""
