"""LoRA: low-rank adapters trained on the UNet and text encoder(s), written in the kohya key format.

keys.py     which modules get adapters, and their names in a kohya LoRA file (lora_unet_*, lora_te*_*)
weights.py  LoraWeights: the adapters of a model as plain tensors (from peft modules, or from extraction); the
            adapter types LoRA, LoHa, LoKr and DoRA
dora.py     DoRA's magnitude per input column, as the webui reads a dora_scale
files.py    the .safetensors file: tensors, kohya / modelspec metadata, the webui's hashes; atomic write
extract.py  a LoRA from a full fine-tune: low-rank SVD of (trained - base) per module
"""
