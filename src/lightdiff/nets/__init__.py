"""Network builders around diffusers / transformers models."""
