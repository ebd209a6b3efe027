"""Everything that makes data: readers, shards, mining, the LLM stages."""
