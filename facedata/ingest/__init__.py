"""Reading the input (parquet, CSV, HF datasets, folders, tars) into a shard plan."""
