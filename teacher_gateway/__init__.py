"""The teacher gateway: teacher embeddings from the cache first and from the teacher only for misses."""
