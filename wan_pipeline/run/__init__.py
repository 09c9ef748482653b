"""Running a generation: the pipeline, sampler, models and their residency, loading, LoRA, precision, attention,
conditioning, VAE kernels and splits, the stock-diffusers reference, one case's rounds, the model cache, and the
torch side of sequence parallelism."""
