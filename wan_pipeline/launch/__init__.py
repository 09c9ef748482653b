"""Launching on several processes: child process groups, the one torchrun launcher and rank entry point of sequence
parallelism, and the matrix over GPUs (sharding, worker processes, JSON merge). torch only inside functions."""
