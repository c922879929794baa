"""Diffusion-model plumbing shared by the methods: image latents, noising/inversion steps, prompt encoding."""
