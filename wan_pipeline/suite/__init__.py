"""The pytest suite: the plugin's hooks, its options, the case matrix, fixtures and the matrix over GPUs."""
