"""Teacher backends: what turns prepared tiles into teacher embeddings."""
