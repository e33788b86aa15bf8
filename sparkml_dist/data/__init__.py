"""Data: shard arithmetic (pure), shard storage on a rank, and Spark-side preparation."""
