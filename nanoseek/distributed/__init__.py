"""Parallelism applied to the model from outside: mesh, FSDP2, expert parallelism, pipelining, checkpoints."""
