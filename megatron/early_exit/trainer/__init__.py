"""Training: optimizer, training step (single process, data parallel, pipelined), loop."""
