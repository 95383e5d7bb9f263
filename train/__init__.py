"""alextrain: stream alexprep's shards into AlexNet, augment on the GPU, checkpoint, resume, evaluate."""
