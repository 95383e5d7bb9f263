"""alexprep: turn ImageNet-1k (or any labelled image set) into 256 px WebDataset shards with RGB stats."""
