"""Adapter layers and the kernels under them: LoRA (with InA as a variant), (IA)³, selection of
adapter parameters by name, train/eval switching that keeps trainability, and the CPU kernels."""
