"""Feature store: one Parquet file per slide (tile coordinates + embeddings) plus a slide catalog."""
