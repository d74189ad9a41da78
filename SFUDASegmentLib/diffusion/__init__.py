"""The conditional diffusion model's noise schedule, samplers and training (the networks are in ``nets``)."""
