"""Catalogs: inputs to classify, the predict stage, the Parquet catalog and the nightly run."""
