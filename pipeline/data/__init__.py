"""Data: sources, prepare, validate, shards (writer and reader), image decoding and transforms."""
