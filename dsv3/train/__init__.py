"""Pre-training: corpus building, tokenizer training, token shards and packed loading, losses,
balancing, the FP8 training linear, optimizer/schedule, the trainer and its parallelization."""
