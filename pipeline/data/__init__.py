"""The data contract: shard schema, labels, shard folders and their manifests, readers, input checks."""
