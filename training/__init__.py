"""Training: stage 1 (SAIPE) and stage 2 (one-step diffusion); see README "Training"."""
