"""The policy (diffusers pipeline + peft LoRA), the pure DDIM-with-log-prob step and the Sampler."""
