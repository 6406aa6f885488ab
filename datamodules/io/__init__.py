"""Data on disk: file readers for the published formats, ``medvlp prepare`` shards, the shard datamodule and
the CSV manifest datamodule for users' own data."""
