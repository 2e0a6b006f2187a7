"""Model definitions of the architectures the generator serves (torch, HF key names)."""
